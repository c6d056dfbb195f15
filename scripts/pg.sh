#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, from Debian's postgresql-15 binaries
# (scripts/setup.sh installs them); never the package's own cluster, never a service.
#   scripts/pg.sh start   [DIR] [PORT]   make (first time) and start the cluster; idempotent
#   scripts/pg.sh stop    [DIR]          stop it (the files stay; `destroy` removes them)
#   scripts/pg.sh restart [DIR]          stop and start again (same port, same data)
#   scripts/pg.sh kill    [DIR]          SIGKILL the postmaster (a crash; `start` recovers)
#   scripts/pg.sh destroy [DIR]          stop it and remove DIR
#   scripts/pg.sh status  [DIR]          exit 0 when it runs
#   scripts/pg.sh url     [DIR]          print the BLUEBATCH_TEST_PG value of a started cluster
# DIR defaults to ${TMPDIR:-/tmp}/bluebatch-pg (the shared test cluster), PORT to 54329, or the
# next free port above it (kept in DIR/port). As root, DIR is given to the postgres user: its
# parent must be traversable by it (a directory right under /tmp is). A test that restarts PostgreSQL or needs TLS starts its OWN cluster
# (its own DIR and PORT): others use the shared one at the same time.
# The cluster listens on 127.0.0.1 only (and a unix socket in DIR). Connections from 127.0.0.1
# are trusted, except for roles that are members of `bb_pw`, which must give their password
# (scram-sha-256): tests of the password sources create such a role.
#   PG_SSL_CERT / PG_SSL_KEY   (at first start) PEM files: the cluster gets ssl=on with them.
# As root, initdb and the server run as the `postgres` user (initdb refuses root); as any other
# user, as that user. fsync is off (a crash of the server loses nothing, one of the machine would).
set -euo pipefail

cmd="${1:-}"
dir="${2:-${TMPDIR:-/tmp}/bluebatch-pg}"
want_port="${3:-54329}"
bin="${PG_BIN:-/usr/lib/postgresql/15/bin}"
data="$dir/data"

die() { echo "pg.sh: $*" >&2; exit 1; }

[ -x "$bin/pg_ctl" ] || die "no PostgreSQL 15 binaries in $bin (scripts/setup.sh installs postgresql-15)"

if [ "$(id -u)" -eq 0 ]; then
    owner=postgres
    id postgres >/dev/null 2>&1 || die "no postgres user (install postgresql-15)"
    as_owner() { runuser -u postgres -- "$@"; }
else
    owner="$(id -un)"
    as_owner() { "$@"; }
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$data/PG_VERSION" ] && as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }

saved_port() { cat "$dir/port" 2>/dev/null || true; }

wait_ready() {
    local port="$1" i
    for i in $(seq 1 300); do
        if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -t 1 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -n 30 "$dir/log" >&2 || true
    die "the cluster in $dir did not get ready on port $port"
}

init_cluster() {
    mkdir -p "$dir"
    as_owner test -x "$(dirname "$dir")" ||
        die "the $owner user cannot enter $(dirname "$dir"): give another DIR (or TMPDIR)"
    chown "$owner" "$dir"
    chmod 0700 "$dir"
    local pwfile
    pwfile="$(mktemp "$dir/.pw.XXXXXX")"
    # The superuser gets a random password nobody uses: 127.0.0.1 is trusted for it (below).
    head -c 18 /dev/urandom | base64 >"$pwfile"
    chown "$owner" "$pwfile"
    as_owner "$bin/initdb" -D "$data" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=trust >"$dir/initdb.log" 2>&1 ||
        { rm -f "$pwfile"; cat "$dir/initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"
    local port="$want_port"
    while port_busy "$port"; do port=$((port + 1)); done
    echo "$port" >"$dir/port"
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "max_connections = 400"
        echo "shared_buffers = 32MB"
        echo "fsync = off"
        echo "full_page_writes = off"
        echo "log_min_messages = warning"
        echo "log_statement = none"
        if [ -n "${PG_SSL_CERT:-}" ]; then
            install -o "$owner" -m 0600 "$PG_SSL_CERT" "$data/server.crt"
            install -o "$owner" -m 0600 "${PG_SSL_KEY:?PG_SSL_KEY with PG_SSL_CERT}" "$data/server.key"
            echo "ssl = on"
            echo "ssl_cert_file = 'server.crt'"
            echo "ssl_key_file = 'server.key'"
        fi
    } | as_owner tee -a "$data/postgresql.conf" >/dev/null
    # First match wins: members of bb_pw give a password, everyone else on 127.0.0.1 is trusted.
    {
        echo "local all all trust"
        echo "host all +bb_pw 127.0.0.1/32 scram-sha-256"
        echo "host all all 127.0.0.1/32 trust"
    } | as_owner tee "$data/pg_hba.conf" >/dev/null
}

start() {
    if running; then
        wait_ready "$(saved_port)"
        return 0
    fi
    [ -f "$data/PG_VERSION" ] || init_cluster
    local port
    port="$(saved_port)"
    [ -n "$port" ] || die "no port file in $dir"
    # A postmaster killed by SIGKILL leaves its pid file: pg_ctl start recovers from that itself.
    touch "$dir/log"
    chown "$owner" "$dir/log"
    as_owner "$bin/pg_ctl" -D "$data" -l "$dir/log" -w -t 60 start >/dev/null ||
        { tail -n 30 "$dir/log" >&2; die "the cluster in $dir did not start"; }
    wait_ready "$port"
    "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 -c \
        "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bb_pw') THEN CREATE ROLE bb_pw NOLOGIN; END IF; END \$\$;" \
        >/dev/null
}

stop() {
    if running; then
        as_owner "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
    fi
}

case "$cmd" in
start) start ;;
stop) stop ;;
restart) stop; start ;;
kill)
    if [ -f "$data/postmaster.pid" ]; then
        pid="$(head -n 1 "$data/postmaster.pid")"
        kill -KILL "$pid" 2>/dev/null || true
        pkill -KILL -P "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    fi
    ;;
destroy) stop; rm -rf "$dir" ;;
status) running ;;
url)
    port="$(saved_port)"
    [ -n "$port" ] || die "no cluster in $dir (scripts/pg.sh start first)"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
*)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
