#!/usr/bin/env bash
# Installs the az CLI the az suite (tests/az) runs, once per machine, into a cached venv:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/bluebatch/az-venv-<version>
# A venv whose az answers is reused (no network); a broken or half-built one is rebuilt.
# Prints the path of the az executable as its last line. Fails (exit 1) if az cannot be installed.
#   AZ_CLI_VERSION=x.y.z  another pinned version (default below)
set -euo pipefail
version="${AZ_CLI_VERSION:-2.91.0}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/bluebatch"
venv="$cache/az-venv-$version"
az="$venv/bin/az"
mkdir -p "$cache"

works() {
    [ -f "$venv/.bluebatch-complete" ] && [ -x "$az" ] || return 1
    local got
    got="$(AZURE_CONFIG_DIR="$venv/.azure-config" AZURE_CORE_COLLECT_TELEMETRY=no \
        timeout 60 "$az" version --query '"azure-cli"' -o tsv 2>/dev/null)" || return 1
    [ "$got" = "$version" ]
}

# One installer at a time (two CI runs on this machine share the cache).
exec 9>"$cache/az-venv-$version.lock"
flock -w 1800 9 || { echo "setup-az: timed out waiting for $cache/az-venv-$version.lock" >&2; exit 1; }

if ! works; then
    echo "setup-az: installing azure-cli==$version into $venv (once; ~700 MB)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { echo "setup-az: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "azure-cli==$version" >&2 \
        || { echo "setup-az: pip install azure-cli==$version failed" >&2; exit 1; }
    touch "$venv/.bluebatch-complete"
    works || { echo "setup-az: $az does not answer 'az version' after the install" >&2; exit 1; }
fi
echo "$az"
