#!/usr/bin/env bash
# Profile of the server on the Update User (key only) path, the way docs/performance.md shows it.
#
#   scripts/profile.sh OUT            # writes OUT.txt, OUT.folded and (with inferno) OUT.svg
#   scripts/profile.sh --compare A B  # where one request's CPU goes in profile A and in B
#                                     # (A.txt + A.folded or A.folded.gz), as a Markdown table
#
# What it does:
#   1. runs `bluebatch-bench --only update-key` (a release `bluebatch serve` with a durable
#      SQLite store under a closed-loop load of Update User {"sshPublicKey"} from N connections,
#      alternating with the do-nothing ceiling GET /_bluebatch/health, as the bench measures it);
#   2. attaches `perf record -e cpu-clock --call-graph dwarf` to that serve process only (every
#      thread, user and kernel), from the moment it is up until the bench prints the Update User
#      row, i.e. for the load's duration;
#   3. keeps only the samples of the Update User slices: time is cut into bins (BIN_MS); a bin
#      is kept when it and both its neighbours have a sample with a frame of the measured path
#      (MARK: Shared Key, the user write, the store) and none with the ceiling's handler (HEALTH:
#      the health endpoint), so no slice boundary falls inside a kept bin;
#   4. writes the kept samples as folded stacks (thread name as the root frame), a top-N table of
#      self and inclusive shares, and a flamegraph SVG if `inferno-flamegraph` is on PATH
#      (`cargo install inferno`; the SVG leaves out frames narrower than MINWIDTH pixels).
#
# Needs: Linux `perf` (Debian/Ubuntu package linux-perf / linux-tools), python3, and the right
# to profile another process: run as root, or set `sysctl kernel.perf_event_paranoid=1` (user
# and kernel samples of your own processes; with 2 only user space is seen, then the kernel
# share shows as missing). Kernel symbols need `kernel.kptr_restrict=0` (or root). On virtual
# machines the hardware `cycles` event is often not available, hence `-e cpu-clock`.
# Unwinding is DWARF (.eh_frame), no frame pointers needed; frames are the binary's symbols
# (functions the compiler inlined are counted in their caller unless INLINE=1).
#
# Environment (defaults in brackets):
#   SERVER_BIN   the `bluebatch` binary profiled           [target/release/bluebatch]
#   BENCH_BIN    the `bluebatch-bench` binary driving it   [target/release/bluebatch-bench]
#   SECONDS_RUN  bench --seconds: Update User time, split in 5 slices   [20]
#   CONNS        bench --conns                              [16]
#   SCENARIO     bench --only                               [update-key]
#   ROW          the bench output line that ends the load   ["(b) Update User, sshPublicKey only"]
#   SERVE_DIR    which of the bench's servers is profiled, by its data directory's name under
#                the bench's work dir: main, or memory for SCENARIO=update-key-memory  [main]
#   MARK         regex: a frame only the measured requests have
#                [bluebatch_wire::sharedkey|write_user|bluebatch_store|sqlite3|^store-writer]
#   HEALTH       regex: a frame only the ceiling's requests have  [bluebatch_wire::controls]
#   FREQ         sampling frequency per CPU (Hz)            [499]
#   STACK        bytes of user stack copied per sample      [16384]
#   BIN_MS       bin width for the slice filter             [250]
#   INLINE=1     name inlined frames too (perf script --inline: much slower, shorter names)
#   TOP          rows of each table                         [30]
#   MINWIDTH     inferno-flamegraph --minwidth (pixels)     [0.5]
#   PIN=1        pass --pin to the bench (server on CPU 1, load generator on CPU 0)
#   LABEL        free text printed in OUT.txt's header (e.g. which commit the binaries are)
#   KEEP=1       keep the work directory (perf.data, bench output) and print where it is
set -euo pipefail

if [ "${1:-}" = --compare ]; then
    [ $# -eq 3 ] || { echo "usage: scripts/profile.sh --compare BEFORE_PREFIX AFTER_PREFIX" >&2; exit 1; }
    exec python3 - "$2" "$3" <<'PY'
# Where the CPU of one request goes, before and after: the inclusive share of samples whose stack
# has a frame matching each group's pattern (a sample counts once per group; groups overlap),
# and that share of the profile's CPU per request.
import gzip, os, re, sys
groups = [
    ("Shared Key (wire auth + sharedkey)", r"bluebatch_wire::(sharedkey|auth)::"),
    ("routing (wire endpoint)", r"bluebatch_wire::endpoint::"),
    ("query string (wire query)", r"bluebatch_wire::query::"),
    ("body parse + key validation (core)", r"bluebatch_core::users::parse|bluebatch_core::sshkey::"),
    ("write_user (service; with any inline commit)", r"bluebatch_service::users::.*write_user"),
    ("  records serialized (put_json)", r"bluebatch_service::put_json"),
    ("  applied on the node (apply_to_node)", r"bluebatch_service::Service::apply_to_node"),
    ("  account snapshot (NodeUser::to_account)", r"NodeUser::to_account"),
    ("store commit (Backend::commit, any thread)", r"as bluebatch_store::Backend>::commit"),
    ("the store-writer thread", r"^store-writer$"),
    ("answer building (wire respond + dto)", r"bluebatch_wire::(respond|dto)::"),
    ("request log (wire server::log_request)", r"bluebatch_wire::server::log_request"),
    ("metrics (bluebatch_metrics)", r"bluebatch_metrics::"),
    ("hyper: request head parse", r"Http1Transaction>::parse"),
    ("kernel: fdatasync", r"__x64_sys_fdatasync"),
    ("kernel: pwrite64 (WAL append)", r"__x64_sys_pwrite64"),
    ("kernel: writev (the answer)", r"do_writev|__x64_sys_writev"),
    ("kernel: recvfrom (the request)", r"__x64_sys_recvfrom"),
    ("kernel: futex (thread wake-ups)", r"__x64_sys_futex"),
    ("kernel: epoll_wait", r"__x64_sys_epoll_wait"),
    ("on CPU in the scheduler (self)", "SELF:^finish_task_switch"),
    ("on CPU in malloc/free (self)", "SELF:^(malloc|_int_malloc|_int_free|cfree@.*|free|realloc|_int_realloc"
     "|malloc_consolidate|unlink_chunk.*|calloc|__libc_calloc|tcache_get|__rustc::__rust_[a-z_]*)$"),
]
def load(prefix):
    path = prefix + ".folded"
    f = open(path) if os.path.exists(path) else gzip.open(path + ".gz", "rt")
    rows = [(st.split(";"), int(n)) for st, n in (l.rstrip("\n").rsplit(" ", 1) for l in f)]
    us = None
    for l in open(prefix + ".txt"):
        m = re.match(r"CPU per request: ≈ ([0-9.]+) µs", l)
        if m:
            us = float(m.group(1))
    return rows, us
def shares(rows):
    tot = sum(n for _, n in rows)
    out = []
    for _, rx in groups:
        if rx.startswith("SELF:"):
            r = re.compile(rx[5:])
            c = sum(n for st, n in rows if r.search(st[-1]))
        else:
            r = re.compile(rx)
            c = sum(n for st, n in rows if any(r.search(f) for f in st))
        out.append(c / tot)
    return tot, out
(ra, ua), (rb, ub) = load(sys.argv[1]), load(sys.argv[2])
(ta, sa), (tb, sb) = shares(ra), shares(rb)
name = lambda p: os.path.basename(p)
print(f"| share of the server's CPU (µs per request) | {name(sys.argv[1])} | {name(sys.argv[2])} |")
print("|---|---:|---:|")
fmt = lambda u: f"{u:.1f} µs" if u else "?"
print(f"| CPU per request, all of it | {fmt(ua)} ({ta} samples) | {fmt(ub)} ({tb} samples) |")
for (g, _), x, y in zip(groups, sa, sb):
    cell = lambda s, u: f"{100*s:.1f} %" + (f" ({u*s:.1f} µs)" if u else "")
    print(f"| {g} | {cell(x, ua)} | {cell(y, ub)} |")
PY
fi

out=${1:?usage: scripts/profile.sh OUT_PREFIX | --compare BEFORE_PREFIX AFTER_PREFIX (see the comment at the top)}
root=$(cd "$(dirname "$0")/.." && pwd)
server=${SERVER_BIN:-$root/target/release/bluebatch}
bench=${BENCH_BIN:-$root/target/release/bluebatch-bench}
secs=${SECONDS_RUN:-20}
conns=${CONNS:-16}
scenario=${SCENARIO:-update-key}
row=${ROW:-(b) Update User, sshPublicKey only}
serve_dir=${SERVE_DIR:-main}
mark=${MARK:-bluebatch_wire::sharedkey|write_user|bluebatch_store|sqlite3|^store-writer}
health=${HEALTH:-bluebatch_wire::controls}
freq=${FREQ:-499}
stack=${STACK:-16384}
bin_ms=${BIN_MS:-250}
inline=--no-inline
[ "${INLINE:-0}" = 1 ] && inline=--inline
top=${TOP:-30}
minwidth=${MINWIDTH:-0.5}

die() { echo "profile.sh: $*" >&2; exit 1; }
command -v perf >/dev/null || die "perf not found: install linux-perf (Debian) / linux-tools (Ubuntu)"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$server" ] || die "server binary $server not found (SERVER_BIN, or cargo build --release -p bluebatch)"
[ -x "$bench" ] || die "bench binary $bench not found (BENCH_BIN, or cargo build --release -p bluebatch-bench)"
paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null || echo 2)
if [ "$(id -u)" -ne 0 ] && [ "$paranoid" -gt 1 ]; then
    die "kernel.perf_event_paranoid is $paranoid: run as root or sysctl kernel.perf_event_paranoid=1"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bluebatch-profile.XXXXXX")
bench_pid='' perf_pid=''
cleanup() {
    [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null || true
    [ -n "$bench_pid" ] && kill "$bench_pid" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "profile.sh: work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
bench_args=(--server-bin "$server" --only "$scenario" --seconds "$secs" --conns "$conns" --work-dir "$work/bench")
[ "${PIN:-0}" = 1 ] && bench_args+=(--pin)
"$bench" "${bench_args[@]}" >"$work/bench.out" 2>"$work/bench.err" &
bench_pid=$!

# The serve process the bench started on its main data directory.
pid=''
for _ in $(seq 1 1200); do
    for p in /proc/[0-9]*; do
        cmd=$( { tr "\0" " " <"$p/cmdline"; } 2>/dev/null) || continue
        case "$cmd" in
        *" serve "*"--data-dir $work/bench/$serve_dir "*) pid=${p#/proc/}; break ;;
        esac
    done
    [ -n "$pid" ] && break
    kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.err" >&2; die "the bench exited before its server started"; }
    sleep 0.1
done
[ -n "$pid" ] || die "no serve process appeared within 120 s"

perf record -e cpu-clock -F "$freq" --call-graph "dwarf,$stack" -p "$pid" -o "$work/perf.data" \
    >"$work/perf.out" 2>&1 &
perf_pid=$!

# Until the bench has printed the row of the measured scenario (or ended).
while kill -0 "$bench_pid" 2>/dev/null && ! grep -qF -- "$row" "$work/bench.out"; do sleep 0.2; done
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" || true
perf_pid=''
wait "$bench_pid" || die "the bench failed: $(tail -5 "$work/bench.err")"
bench_pid=''
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
grep -qF -- "$row" "$work/bench.out" || die "the bench never printed '$row'"

mkdir -p "$(dirname "$out")"
perf script $inline -i "$work/perf.data" -F comm,tid,time,ip,sym,dso 2>"$work/script.err" >"$work/script.txt"

{
    echo "# bluebatch profile: bench scenario $scenario (the serve of its '$serve_dir' data directory)"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    [ -n "${LABEL:-}" ] && echo "binaries: $LABEL"
    echo "server: $(basename "$server") (sha256 $(sha256sum "$server" | cut -c1-12), built $(stat -c %y "$server" | cut -d. -f1) UTC)"
    echo "bench:  $(basename "$bench") (sha256 $(sha256sum "$bench" | cut -c1-12))"
    args="${bench_args[*]//$work/WORK}"
    echo "load:   bluebatch-bench ${args//$server/SERVER_BIN}"
    echo "perf:   perf record -e cpu-clock -F $freq --call-graph dwarf,$stack -p <serve pid> (the load's duration)"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), load average $load_start at the start, $load_end at the end"
    echo "bench output (the rows of this run):"
    grep -E '^\(' "$work/bench.out" | sed 's/^/    /'
} >"$out.txt"

python3 - "$work/script.txt" "$out" "$mark" "$health" "$bin_ms" "$top" "$work/bench.out" "$row" "$freq" \
    >>"$out.txt" <<'PY'
import re, sys
from collections import Counter, defaultdict

path, out = sys.argv[1], sys.argv[2]
mark, health = re.compile(sys.argv[3]), re.compile(sys.argv[4])
bin_ms, top = float(sys.argv[5]), int(sys.argv[6])
bench_out, row, freq = sys.argv[7], sys.argv[8], float(sys.argv[9])
head = re.compile(r"^(.*?)\s+(\d+)\s+(\d+\.\d+):\s*$")
frame = re.compile(r"^\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
hashsfx = re.compile(r"::h[0-9a-f]{16}$")

def name(sym, dso):
    if sym == "[unknown]":
        d = dso.rsplit("/", 1)[-1].strip("[]")
        return None if d == "unknown" else "[" + d + "]"
    sym = hashsfx.sub("", sym).replace(";", ":")
    return sym + ("_[k]" if dso.startswith("[kernel") else "")

samples = []  # (time, [thread, root..leaf])
cur = None
def flush():
    if cur and cur[2]:
        samples.append((cur[1], [cur[0]] + [f for f in cur[2][::-1] if f]))
with open(path, errors="replace") as f:
    for line in f:
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            cur = None
            continue
        if cur is None:
            m = head.match(line)
            if m:
                comm = m.group(1).strip()
                comm = re.sub(r"[-_]?\d+$", "", comm) or comm
                cur = (comm.replace(" ", "_"), float(m.group(3)), [])
            continue
        m = frame.match(line)
        if m:
            cur[2].append(name(m.group(1), m.group(2)))
flush()
if not samples:
    sys.exit("no samples: see perf's output (perf_event_paranoid? the process ended?)")

t0 = min(t for t, _ in samples)
bins = defaultdict(list)
for t, st in samples:
    bins[int((t - t0) * 1000 / bin_ms)].append(st)
def has(rx, sts):
    return any(rx.search(fr) for st in sts for fr in st)
good = {b for b, sts in bins.items() if has(mark, sts) and not has(health, sts)}
keep = sorted(b for b in good if b - 1 in good and b + 1 in good)
kept = [st for b in keep for st in bins[b]]
if not kept:
    sys.exit(f"no {bin_ms:.0f} ms bin of measured samples: are MARK /{mark.pattern}/ and HEALTH /{health.pattern}/ right for this binary?")

folded = Counter(";".join(st) for st in kept)
with open(out + ".folded", "w") as f:
    for k, v in sorted(folded.items()):
        f.write(f"{k} {v}\n")

n = len(kept)
selfc, incl, thread = Counter(), Counter(), Counter()
for st in kept:
    thread[st[0]] += 1
    selfc[st[-1]] += 1
    for fr in set(st[1:]):
        incl[fr] += 1
print(f"samples: {len(samples)} recorded; {n} kept = {len(keep)} bins of {bin_ms:.0f} ms inside "
      f"the measured slices (a bin is kept when it and both neighbours have a frame matching "
      f"/{mark.pattern}/ and none matching /{health.pattern}/, the ceiling's handler)")
rate = None
for line in open(bench_out, errors="replace"):
    if line.startswith(row):
        # ROW may be only the start of the label ("(d) Add User / Delete User" of
        # "…, alternating"): the figures are the first numbers after it (conns, ops/s, …).
        m = re.search(r"\s(\d+)\s+(\d+)\s+\d+\s+[\d.]+\s+[\d.]+", line[len(row):])
        rate = float(m.group(2)) if m else None
        break
if rate:
    secs = len(keep) * bin_ms / 1000
    print(f"CPU per request: ≈ {1e6 * n / freq / (rate * secs):.1f} µs = {n} samples / {freq:.0f} Hz "
          f"/ ({rate:.0f} ops/s of the bench row × {secs:.2f} s kept)")
def short(s, w=160):
    return s if len(s) <= w else s[: w - 1] + "…"
def table(title, items):
    print(f"\n## {title}")
    for k, v in items:
        print(f"{100*v/n:6.1f} %  {short(k)}")
table("by thread (share of kept samples)", thread.most_common())
table(f"top {top} by self (the function on CPU; _[k] = kernel)", selfc.most_common(top))
table(f"top {top} bluebatch functions, inclusive (the function anywhere on the stack)",
      [(k, v) for k, v in incl.most_common() if "bluebatch_" in k][:top])
sysc = Counter()
for st in kept:
    if "do_syscall_64_[k]" in st:
        i = st.index("do_syscall_64_[k]")
        sysc[st[i + 1] if i + 1 < len(st) else "do_syscall_64_[k]"] += 1
table("system calls, inclusive (the kernel function entered from do_syscall_64)", sysc.most_common(top))
table(f"top {top} of everything, inclusive",
      incl.most_common(top))
PY

if command -v inferno-flamegraph >/dev/null; then
    inferno-flamegraph --minwidth "$minwidth" --title "bluebatch serve: Update User (key only), $(basename "$out")" \
        --width 1600 <"$out.folded" >"$out.svg"
    echo "wrote $out.txt $out.folded $out.svg ($(du -k "$out.svg" | cut -f1) kB)"
else
    echo "wrote $out.txt $out.folded (no inferno-flamegraph on PATH: cargo install inferno for the SVG)"
fi
