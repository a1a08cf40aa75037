# Sourced by .ci/run: a throw-away PostgreSQL server on 127.0.0.1 for the jobs tests, with
# PEFTKIT_TEST_POSTGRES_URL exported; installs Debian's `postgresql` package when it is
# missing and we are root. Where it cannot (no apt, not root), it says so and the tests'
# PostgreSQL variants skip with a message.
peftkit_pg_start() {
    local bin dir port run
    local lib=${PEFTKIT_PG_LIB:-/usr/lib/postgresql}
    bin=$(ls -d "$lib"/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -z "${PEFTKIT_PG_NO_INSTALL:-}" ]; then
        echo "installing PostgreSQL (Debian package postgresql)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
        bin=$(ls -d "$lib"/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    if [ -z "$bin" ]; then
        echo "no PostgreSQL found (and cannot install it): the PostgreSQL variants of the jobs tests will skip"
        return 0
    fi
    dir=$(mktemp -d /tmp/peftkit-pg.XXXXXX)
    run=()
    if [ "$(id -u)" = 0 ]; then  # initdb refuses root: run the server as the postgres user
        chown postgres "$dir"
        run=(runuser -u postgres --)
    fi
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${run[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log"; return 1; }
    "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "-h 127.0.0.1 -p $port -k $dir -F" -w start >/dev/null \
        || { cat "$dir/server.log"; return 1; }
    export PEFTKIT_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    PEFTKIT_PG_STOP=("${run[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
    trap 'peftkit_pg_stop' EXIT
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port for the tests"
}

peftkit_pg_stop() {
    if [ -n "${PEFTKIT_PG_STOP[*]:-}" ]; then
        "${PEFTKIT_PG_STOP[@]}" >/dev/null 2>&1 || true
    fi
}

peftkit_pg_start
