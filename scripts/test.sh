#!/usr/bin/env bash
# Every test of bluebatch: formatting, lints, the Rust suites (unit, HTTP-level, real OpenSSH),
# then the real azure-batch Python SDK against the built server.
# Needs Rust and Python 3; scripts/setup.sh (run first) installs the OpenSSH client and sshpass.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== azure-batch SDK + OpenSSH (tests/sdk)"
cargo build -p bluebatch
BLUEBATCH_BIN="$PWD/target/debug/bluebatch" tests/sdk/run.sh
