# simulated-exchange: the user's entry points. Each target is one line that calls a binary or
# a script; logic lives in those, not here. `make help` lists every target.
.DEFAULT_GOAL := help
CARGO ?= cargo
RELEASE := $(CARGO) build --release --workspace --bins

.PHONY: help demo down load capacity test fmt lint bench-engine bench-e2e chaos-list chaos-cleanup chaos-network-partition chaos-cpu-throttle chaos-oom-kill chaos-disk-io chaos-cascade chaos-flamegraph chaos-packet-loss chaos-db-outage chaos-broker-outage chaos-engine-crash

help: ## list every target with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-26s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## build, start the stack natively, drive the demo load (60 s at 30/s), audit it, print where to look
	scripts/ensure-deps demo && $(RELEASE) && target/release/lab up --bin-dir target/release && target/release/loadgen run --rate 30 --duration 60s && target/release/loadgen audit && target/release/lab where

load: ## drive the running stack: 60 s at 30 orders/s (./generate-load.sh DURATION_S RATE for others), then audit
	./generate-load.sh 60 30 && target/release/loadgen audit

capacity: ## find the highest rate the running stack sustains (p99 <= 50 ms) and its headroom over 30/s
	target/release/loadgen capacity

down: ## stop the stack started by `make demo` and everything it started
	target/release/lab down

test: ## fmt check, clippy -D warnings, and every test (installs what the tests need)
	scripts/ensure-deps test && $(CARGO) fmt --all --check && $(CARGO) clippy --workspace --all-targets -- -D warnings && $(CARGO) test --workspace

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

CHAOS = $(CARGO) build --release -q -p chaos && target/release/chaos
CHAOS_FLAGS ?=

chaos-list: ## list the chaos experiments (CHAOS_FLAGS=--quick for the short CI variants)
	$(CHAOS) list

chaos-network-partition: ## cut gateway <-> engine under load (iptables); 202s, then everything delivered
	$(CHAOS) run network-partition $(CHAOS_FLAGS)

chaos-cpu-throttle: ## engine limited to 5% of a CPU (cfs quota); graceful degradation, backlog drained
	$(CHAOS) run cpu-throttle $(CHAOS_FLAGS)

chaos-oom-kill: ## persistence squeezed until the kernel OOM-kills it; the lab restarts it; nothing lost
	$(CHAOS) run oom-kill $(CHAOS_FLAGS)

chaos-disk-io: ## engine's disk throttled to 20 writes/s (blkio); fsync latency, group commit
	$(CHAOS) run disk-io $(CHAOS_FLAGS)

chaos-cascade: ## engine CPU-starved, cut off, and PostgreSQL down, one after the other
	$(CHAOS) run cascade $(CHAOS_FLAGS)

chaos-flamegraph: ## profile the gateway before and during a partition; differential flamegraph
	$(CHAOS) run flamegraph $(CHAOS_FLAGS)

chaos-packet-loss: ## 20% packet loss gateway <-> engine; TCP retransmits and tail latency
	$(CHAOS) run packet-loss $(CHAOS_FLAGS)

chaos-db-outage: ## PostgreSQL stopped under load; persisted exactly once when it returns
	$(CHAOS) run db-outage $(CHAOS_FLAGS)

chaos-broker-outage: ## RabbitMQ stopped under load; the engine's outbox catches up
	$(CHAOS) run broker-outage $(CHAOS_FLAGS)

chaos-engine-crash: ## SIGKILL the engine under load; journal replay, nothing lost or doubled
	$(CHAOS) run engine-crash $(CHAOS_FLAGS)

chaos-cleanup: ## revert whatever an interrupted chaos run left behind (iptables, cgroups, held components)
	$(CHAOS) cleanup

PROFILER = $(CARGO) build --release -q -p profiler && target/release/profiler
PROFILE_FLAGS ?=
.PHONY: profile-cpu profile-all profile-view profile-analyze bench-profiling-overhead bench-probes-overhead probes

profile-cpu: ## 30 s CPU profile of every service under the demo load -> profiles/<time>/<service>.svg, .pb.gz
	$(PROFILER) cpu $(PROFILE_FLAGS)

profile-all: ## CPU, heap and (with the eBPF agent) off-CPU profiles of every service, plus a metrics snapshot -> profiles/<time>/
	$(PROFILER) all $(PROFILE_FLAGS)

profile-view: ## index.html of the newest profiles; opened in a browser, or served on 127.0.0.1:8099
	$(PROFILER) view $(PROFILE_FLAGS)

profile-analyze: ## CPU share by category, top functions, suggestions (categories: profiler/categories.toml)
	$(PROFILER) analyze $(PROFILE_FLAGS)

bench-profiling-overhead: ## CPU per 1,000 orders and throughput, 99 Hz profiling on vs off -> target/bench/profiling-overhead.json
	$(PROFILER) overhead $(PROFILE_FLAGS)

bench-probes-overhead: ## CPU per 1,000 orders and throughput, eBPF agent on vs off, plus each program's kernel run time (root) -> target/bench/probes-overhead.json
	$(PROFILER) overhead --subject probes $(PROFILE_FLAGS)

probes: ## what eBPF this host offers (probes check), then start the lab's eBPF agent (root) and print where its metrics are
	$(CARGO) build --release -q -p probes -p lab && target/release/probes check && target/release/lab start probes && target/release/lab where

bench-e2e: ## whole-pipeline throughput (p99 < 20 ms) and latency vs RabbitMQ/PostgreSQL ceilings -> target/bench/e2e.json
	$(CARGO) build --release --workspace --bins && target/release/bench-e2e

bench-engine: ## single-thread order book benchmark -> target/bench/engine.json
	$(CARGO) run --release -p matching-engine --bin bench-engine
