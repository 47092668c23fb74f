#!/usr/bin/env bash
# Every test Strait has: formatting, lints, unit, integration and
# end-to-end tests (real sockets on loopback, dig for DNS).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-tools.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
