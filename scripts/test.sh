#!/usr/bin/env bash
# Every test of bluebatch: formatting, lints, the Rust suites (unit, HTTP-level, real OpenSSH),
# then the real azure-batch Python SDK and the real az CLI against the built server.
# Needs Rust and Python 3; scripts/setup.sh (run first) installs the OpenSSH client and sshpass,
# and the az CLI into a cached venv (scripts/setup-az.sh). Nothing is skipped: a missing tool fails.
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
echo "== az CLI (tests/az)"
BLUEBATCH_BIN="$PWD/target/debug/bluebatch" tests/az/run.sh
