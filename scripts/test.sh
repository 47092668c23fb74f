#!/usr/bin/env bash
# Every test Strait has: formatting, lints, unit, integration and
# end-to-end tests (real sockets on loopback, dig for DNS).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-tools.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --doc 2>&1 | tee "$log"
cargo test --workspace --all-targets 2>&1 | tee -a "$log"
# The release proxy as its image builds it: instrumented, trained through
# the pair, optimised with the profile, and checked to serve
# (scripts/build-proxy.sh), with this run's debug strait and loadgen.
STRAIT_PGO_TOOLS="${CARGO_TARGET_DIR:-target}/debug" scripts/build-proxy.sh
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
