#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a few seconds each (a smoke run, not a campaign):
#   scripts/fuzz-smoke.sh [SECONDS] [TARGET...]      (default: 10 seconds, every target)
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). Each target starts from
# the seeds in fuzz/seeds/<target>, with the tokens of fuzz/dicts/<target>.dict if there is one,
# and keeps what it finds in fuzz/corpus/<target> (not in git).
# A crash leaves its input in fuzz/artifacts/<target>/ and makes this script exit non-zero;
# reproduce it with: cargo +nightly fuzz run -O <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-10}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz-smoke: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: cargo-fuzz is missing (cargo install cargo-fuzz)" >&2
    exit 2
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "== building the fuzz targets"
cargo +nightly fuzz build -O 2>&1 | tail -n 1

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
    echo "== $t (${seconds}s)"
    if cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "${dict[@]}" \
        2>"fuzz/$t.log"; then
        grep -E "^stat::number_of_executed_units|^stat::new_units_added" "fuzz/$t.log" | tr '\n' ' '
        echo
        rm -f "fuzz/$t.log"
    else
        echo "!! $t failed; log: fuzz/$t.log"
        tail -n 30 "fuzz/$t.log"
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-smoke: failures in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets, ${seconds}s each, no crash"
