# simulated-exchange: the user's entry points. Each target is one line that calls a binary or
# a script; logic lives in those, not here. `make help` lists every target.
.DEFAULT_GOAL := help
CARGO ?= cargo
RELEASE := $(CARGO) build --release --workspace --bins

.PHONY: help demo down load capacity test fmt lint bench-engine

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
	scripts/ensure-deps test && $(CARGO) fmt --all --check && $(CARGO) clippy --workspace --all-targets -- -D warnings && $(CARGO) build --workspace --bins && $(CARGO) test --workspace

fmt: ## format the code
	$(CARGO) fmt --all

lint: ## clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench-engine: ## single-thread order book benchmark -> target/bench/engine.json
	$(CARGO) run --release -p matching-engine --bin bench-engine
