#!/usr/bin/env bash
# Run the real-client (azure-batch) test suite against the bluebatch binary.
#   VENV=path          virtualenv to create/use (default: tests/sdk/.venv)
#   BLUEBATCH_BIN=path server binary (default: <repo>/target/debug/bluebatch)
#   BLUEBATCH_SDK_NODES=agents   nodes from a `bluebatch agent --simulate` (see conftest.py)
#   BLUEBATCH_SDK_NODES=sandbox  `serve --nodes sandbox` (root): sandboxed machines as nodes
#   BLUEBATCH_SDK_STORE=postgres two replicas on one PostgreSQL database behind the round-robin
#                      proxy tests/lb/rr_proxy.py, every request alternating between them; the
#                      cluster is BLUEBATCH_TEST_PG's, or (unset) a throwaway one that
#                      scripts/pg.sh starts here and stops at the end
# Extra arguments go to pytest. Exits with pytest's status.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cd "$here"
if [ "${BLUEBATCH_SDK_STORE:-}" = postgres ] && [ -z "${BLUEBATCH_TEST_PG:-}" ]; then
    pgdir="${TMPDIR:-/tmp}/bluebatch-sdk-pg"
    "$here/../../scripts/pg.sh" start "$pgdir" 54339 >/dev/null
    trap '"$here/../../scripts/pg.sh" stop "$pgdir" >/dev/null || true' EXIT
    BLUEBATCH_TEST_PG="$("$here/../../scripts/pg.sh" url "$pgdir")"
    export BLUEBATCH_TEST_PG
fi
set +e
"$venv/bin/python" -m pytest -q "$@"
status=$?
exit $status
