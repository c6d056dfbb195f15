#!/usr/bin/env bash
# Browser tests of the web console: Debian's headless Chromium (/usr/bin/chromium with
# /usr/bin/chromedriver; no browser is downloaded) driven by Selenium against `bluebatch serve`.
#   VENV=path          virtualenv to create/use (default: tests/console/.venv)
#   BLUEBATCH_BIN=path server binary (default: <repo>/target/debug/bluebatch, built here with
#                      `cargo build -p bluebatch` when BLUEBATCH_BIN is not set)
#   CHROMIUM=path, CHROMEDRIVER=path   the browser and its driver (defaults above)
# Screenshots of every page go to docs/console/*.png (overwritten on each run).
# Extra arguments go to pytest. Exits with pytest's status.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$here/.venv}"
if [ -z "${BLUEBATCH_BIN:-}" ]; then
    (cd "$repo" && cargo build -q -p bluebatch)
    BLUEBATCH_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/bluebatch"
    export BLUEBATCH_BIN
fi
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cd "$here"
set +e
"$venv/bin/python" -m pytest -q "$@"
status=$?
exit $status
