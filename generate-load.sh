#!/usr/bin/env bash
# ./generate-load.sh [DURATION_S] [RATE] [more `loadgen run` flags]
# Drives the running stack (started by `make demo`) with open-model load: DURATION_S seconds at
# RATE orders/s (default: the original demo's 60 s at 30 orders/s), writing a ledger that
# `target/release/loadgen audit` checks afterwards.
set -euo pipefail
cd "$(dirname "$0")"
duration=${1:-60}
rate=${2:-30}
[[ $duration =~ ^[0-9]+$ && $duration -gt 0 ]] || { echo "DURATION_S must be a positive whole number of seconds, got '$duration'" >&2; exit 64; }
[[ $rate =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "RATE must be a positive number of orders per second, got '$rate'" >&2; exit 64; }
shift $(( $# < 2 ? $# : 2 ))
[ -x target/release/loadgen ] || cargo build --release -p loadgen
exec target/release/loadgen run --duration "${duration}s" --rate "$rate" "$@"
