# simulated-exchange: the user's entry points. Each target is one line that calls a binary or
# a script; logic lives in those, not here. `make help` lists every target.
.DEFAULT_GOAL := help
CARGO ?= cargo
RELEASE := $(CARGO) build --release --workspace --bins

.PHONY: help demo down test fmt lint bench-engine

help: ## list every target with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-26s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo: ## build release binaries and start the whole stack natively (see README)
	scripts/ensure-deps demo && $(RELEASE) && target/release/lab up --bin-dir target/release

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
