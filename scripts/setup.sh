#!/usr/bin/env bash
# Installs what the tests need besides Rust and Python: the OpenSSH client and sshpass, the
# azure-batch venv of tests/sdk, and the
# az CLI (a cached venv, reused across runs and clones: scripts/setup-az.sh).
set -euo pipefail
need=()
command -v ssh >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v sshpass >/dev/null || need+=(sshpass)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
python3 -m venv --help >/dev/null 2>&1 || { echo "python3 venv module missing (apt-get install python3-venv)"; exit 1; }
"$(dirname "$0")/setup-az.sh" >/dev/null
# The azure-batch SDK venv (tests/sdk/.venv): the SDK suite uses it, and so does a Rust test that
# runs the Python snippet `bluebatch env --python` prints; made before `cargo test` runs.
sdk="$(cd "$(dirname "$0")/../tests/sdk" && pwd)"
[ -x "$sdk/.venv/bin/python" ] || python3 -m venv "$sdk/.venv"
"$sdk/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$sdk/requirements.txt"
