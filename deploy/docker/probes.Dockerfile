# syntax=docker/dockerfile:1
# The eBPF agent (`probes`), for the compose profile `ebpf`. Its build compiles the C eBPF
# programs with clang-14 (probes/build.rs); at run time it needs a privileged container in the
# host's pid namespace (see docker-compose.yml) and a kernel with BTF and tracefs.
# Context: the repository root (see .dockerignore).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang-14 libbpf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p probes --bins \
    && mkdir -p /out && cp target/release/probes /out/

FROM debian:bookworm-slim
ARG BIN=probes
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
COPY --from=build /out/${BIN} /usr/local/bin/probes
ENV APP__DATA__DIR=/data \
    APP__LOG__FORMAT=json
ENTRYPOINT ["/usr/local/bin/probes"]
