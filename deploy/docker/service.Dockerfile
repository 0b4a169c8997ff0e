# syntax=docker/dockerfile:1
# The image of one service of the exchange: the same binary `make demo` runs natively, built
# from this workspace. docker-compose.yml builds it three times with
#   --build-arg BIN=order-gateway | matching-engine | persistence
# The build stage does not depend on BIN, so BuildKit builds the workspace once for all three.
# Context: the repository root (see .dockerignore).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Only the three services and what they depend on (the eBPF agent needs clang: probes.Dockerfile).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p order-gateway -p matching-engine -p persistence --bins \
    && mkdir -p /out \
    && cp target/release/order-gateway target/release/matching-engine target/release/persistence /out/

FROM debian:bookworm-slim
ARG BIN
# curl: the compose healthcheck (GET /readyz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin exchange \
    && mkdir -p /data && chown exchange /data
COPY --from=build /out/${BIN} /usr/local/bin/service
USER exchange
# Configured only through APP__* variables (kit's config module); compose sets the rest.
ENV APP__DATA__DIR=/data \
    APP__LOG__FORMAT=json
VOLUME ["/data"]
# SIGTERM starts a graceful drain (kit::shutdown).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/service"]
