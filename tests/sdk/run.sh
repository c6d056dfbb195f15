#!/usr/bin/env bash
# Run the real-client (azure-batch) test suite against the bluebatch binary.
#   VENV=path          virtualenv to create/use (default: tests/sdk/.venv)
#   BLUEBATCH_BIN=path server binary (default: <repo>/target/debug/bluebatch)
# Extra arguments go to pytest. Exits with pytest's status.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cd "$here"
set +e
"$venv/bin/python" -m pytest -q "$@"
status=$?
exit $status
