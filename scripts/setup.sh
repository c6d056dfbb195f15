#!/usr/bin/env bash
# Installs what the tests need besides Rust and Python: the OpenSSH client and sshpass; PostgreSQL
# 15 (postgresql-15, for scripts/pg.sh's throwaway cluster); for the
# agent tests a real sshd (openssh-server, never started as a service here: each test runs its own
# in a namespace), sudo, ip and the shadow tools; the azure-batch venv of tests/sdk, and the
# az CLI (a cached venv, reused across runs and clones: scripts/setup-az.sh); chromium and
# chromium-driver for the console's browser tests.
set -euo pipefail
need=()
command -v ssh >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v sshpass >/dev/null || need+=(sshpass)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
[ -x /usr/sbin/visudo ] || need+=(sudo)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
command -v useradd >/dev/null || need+=(passwd)
command -v pkill >/dev/null || need+=(procps)
# cargo: the bundled SQLite needs a C compiler, jemalloc (the server's allocator) make too
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc)
command -v ssh-keyscan >/dev/null || need+=(openssh-client)
# PostgreSQL 15 for the PostgreSQL store's tests: scripts/pg.sh runs a throwaway cluster from its
# binaries (the package's own cluster is never started: policy-rc.d below).
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
# Debian's Chromium and its driver for the console's browser tests (tests/console: Selenium is
# pointed at these; it never downloads a browser).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # Installing openssh-server must not start a host sshd, nor postgresql-15 its cluster: a
    # policy-rc.d of our own (only when the machine has none) tells the package scripts not to
    # start services.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        policy=1
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" || rc=$?
    [ -z "$policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || exit "$rc"
fi
python3 -m venv --help >/dev/null 2>&1 || { echo "python3 venv module missing (apt-get install python3-venv)"; exit 1; }
"$(dirname "$0")/setup-az.sh" >/dev/null
# The azure-batch SDK venv (tests/sdk/.venv): the SDK suite uses it, and so does a Rust test that
# runs the Python snippet `bluebatch env --python` prints; made before `cargo test` runs.
sdk="$(cd "$(dirname "$0")/../tests/sdk" && pwd)"
[ -x "$sdk/.venv/bin/python" ] || python3 -m venv "$sdk/.venv"
"$sdk/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$sdk/requirements.txt"
