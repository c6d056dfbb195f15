#!/usr/bin/env bash
# Every test of bluebatch: formatting, lints, the Rust suites (unit, HTTP-level, real OpenSSH),
# then the real azure-batch Python SDK, the real az CLI and the web console in Debian's headless
# Chromium against the built server.
# Needs Rust and Python 3; scripts/setup.sh (run first) installs the OpenSSH client and sshpass,
# and the az CLI into a cached venv (scripts/setup-az.sh). A missing tool fails the run.
# Locally, a test whose prerequisite is missing (root, for the per-session uid checks) skips those
# checks with a loud "SKIPPED CHECKS" note; with CI=true (as .ci/run sets) that is a failure.
#   BLUEBATCH_LONG=1   the long crash, concurrency, agreement and power-loss variants
# Each stage prints "== stage" when it starts and "-- stage took N s" when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

stage() {
    local name="$1" t0=$SECONDS rc=0
    shift
    echo "== $name"
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "!! $name failed (exit $rc) after $((SECONDS - t0)) s"
        exit "$rc"
    fi
    echo "-- $name took $((SECONDS - t0)) s"
}

start=$SECONDS
stage "setup (scripts/setup.sh)" scripts/setup.sh
stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
# The fuzz crate (its own workspace, on nightly) calls the wire and protocol crates' parsers: a
# changed signature breaks it without breaking the workspace, so it is linted here too when the
# nightly toolchain is present (.ci/run requires it and fuzzes each target).
if cargo +nightly --version >/dev/null 2>&1; then
    stage "fuzz crate: cargo +nightly clippy" cargo +nightly clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
else
    echo "SKIPPED CHECKS: the fuzz crate's lint (no nightly toolchain; .ci/run requires it)"
fi
# The PostgreSQL store's suites run against a throwaway cluster (scripts/pg.sh), stopped at the
# end however the run ends.
stage "PostgreSQL test cluster (scripts/pg.sh start)" scripts/pg.sh start
trap 'scripts/pg.sh stop || true' EXIT
BLUEBATCH_TEST_PG="$(scripts/pg.sh url)"
export BLUEBATCH_TEST_PG
stage "cargo test" cargo test --workspace
stage "Update User, protocol and concurrency suites on two PostgreSQL replicas behind a round-robin proxy (BLUEBATCH_TEST_REPLICAS=1)" env BLUEBATCH_TEST_REPLICAS=1 cargo test -p bluebatch --test update_user --test protocol --test concurrency
stage "cargo build -p bluebatch" cargo build -p bluebatch
export BLUEBATCH_BIN="$PWD/target/debug/bluebatch"
stage "azure-batch SDK + OpenSSH (tests/sdk)" tests/sdk/run.sh
stage "azure-batch SDK on agent nodes (tests/sdk, BLUEBATCH_SDK_NODES=agents)" env BLUEBATCH_SDK_NODES=agents tests/sdk/run.sh
# Sandboxed nodes (a network, mount and PID namespace and a real sshd per node) need root.
if [ "$(id -u)" -eq 0 ]; then
    stage "azure-batch SDK on sandboxed nodes (tests/sdk, BLUEBATCH_SDK_NODES=sandbox)" env BLUEBATCH_SDK_NODES=sandbox tests/sdk/run.sh
elif [ "${CI:-}" = true ]; then
    echo "!! the SDK suite on sandboxed nodes needs root (serve --nodes sandbox)"
    exit 1
else
    echo "SKIPPED CHECKS: the SDK suite on sandboxed nodes (needs root)"
fi
stage "azure-batch SDK on two PostgreSQL replicas behind a round-robin proxy (tests/sdk, BLUEBATCH_SDK_STORE=postgres)" env BLUEBATCH_SDK_STORE=postgres tests/sdk/run.sh test_user_flow.py test_ssh_login.py test_unserved.py test_early_answers.py
stage "az CLI (tests/az)" tests/az/run.sh
stage "web console in headless Chromium (tests/console)" tests/console/run.sh
echo "-- scripts/test.sh took $((SECONDS - start)) s"
