#!/usr/bin/env bash
# Run the az CLI suite against the bluebatch binary.
#   VENV=path          venv with pytest and azure-batch 15.1 for the API checks (default: tests/sdk/.venv,
#                      shared with the SDK suite)
#   BLUEBATCH_BIN=path server binary (default: <repo>/target/debug/bluebatch)
#   BLUEBATCH_AZ=path  az executable (default: installed or reused by scripts/setup-az.sh)
# Extra arguments go to pytest. Fails when az cannot be installed: it never skips.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo/tests/sdk/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$repo/tests/sdk/requirements.txt"
if [ -z "${BLUEBATCH_AZ:-}" ]; then
    BLUEBATCH_AZ="$("$repo/scripts/setup-az.sh" | tail -n 1)"
fi
export BLUEBATCH_AZ
cd "$here"
exec "$venv/bin/python" -m pytest -q "$@"
