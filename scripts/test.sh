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
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
