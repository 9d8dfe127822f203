# shellcheck shell=bash
# Start a private MariaDB server for the DB-Bench tests (source this file; idempotent).
#
#   source .ci/mariadb.sh        # installs mariadb-server if missing, starts the server,
#                                # waits until it answers, exports CYCLEQD_MARIADB_*
#
# The server: its own data directory (default /tmp/cycleqd-mariadb), run as root
# (--user=root), listening on a unix socket in that directory and on 127.0.0.1 only,
# sql_mode='' (non-strict: some DB-Bench tables put text such as "-" into numeric
# columns; AgentBench's MySQL image is run the same way). root connects through the
# socket (unix_socket authentication); the evaluator creates one throw-away user and
# database per episode. Character set utf8mb4: with the server's built-in default
# (latin1) every non-ASCII value hashes differently from the benchmark's answer_md5.
#
# Durability is traded for speed (no fsync): the databases are throw-away test fixtures.
#
# Exports: CYCLEQD_MARIADB_SOCKET, CYCLEQD_MARIADB_HOST, CYCLEQD_MARIADB_PORT.
# Overrides: CYCLEQD_MARIADB_DIR, CYCLEQD_MARIADB_PORT.
# Returns non-zero (never exits the calling shell) if the server cannot be started.

cycleqd_mariadb_start() {
    local dir="${CYCLEQD_MARIADB_DIR:-/tmp/cycleqd-mariadb}"
    local port="${CYCLEQD_MARIADB_PORT:-3407}"
    local sock="$dir/mysqld.sock"
    local server admin installdb

    server="$(command -v mariadbd || command -v mysqld || true)"
    if [ -z "$server" ] && [ -x /usr/sbin/mariadbd ]; then server=/usr/sbin/mariadbd; fi
    if [ -z "$server" ]; then
        echo "mariadb.sh: mariadb-server not installed; installing (apt-get)" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends mariadb-server >/dev/null; }; then
            echo "mariadb.sh: could not install mariadb-server" >&2
            return 1
        fi
        server="$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)"
    fi
    admin="$(command -v mariadb-admin || command -v mysqladmin || true)"
    installdb="$(command -v mariadb-install-db || command -v mysql_install_db || true)"
    if [ -z "$admin" ] || [ -z "$installdb" ]; then
        echo "mariadb.sh: mariadb-admin / mariadb-install-db not found" >&2
        return 1
    fi

    export CYCLEQD_MARIADB_SOCKET="$sock"
    export CYCLEQD_MARIADB_HOST=127.0.0.1
    export CYCLEQD_MARIADB_PORT="$port"

    if "$admin" --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1; then
        return 0  # already running
    fi

    mkdir -p "$dir"
    if [ ! -d "$dir/data/mysql" ]; then
        if ! "$installdb" --no-defaults --user=root --datadir="$dir/data" \
                --auth-root-authentication-method=socket >"$dir/install.log" 2>&1; then
            echo "mariadb.sh: mariadb-install-db failed, see $dir/install.log" >&2
            return 1
        fi
    fi
    rm -f "$sock" "$dir/mysqld.pid"
    # setsid: the server outlives the shell that sourced this file.
    setsid "$server" --no-defaults --user=root --datadir="$dir/data" --socket="$sock" \
        --port="$port" --bind-address=127.0.0.1 --pid-file="$dir/mysqld.pid" \
        --log-error="$dir/error.log" --sql-mode='' --skip-name-resolve \
        --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
        --innodb-buffer-pool-size=64M --max-connections=500 --max-statement-time=0 \
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-flush-method=nosync \
        --skip-log-bin \
        </dev/null >/dev/null 2>&1 &

    local i client
    client="$(command -v mariadb || command -v mysql || true)"
    for i in $(seq 1 120); do
        if "$admin" --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1; then
            # no anonymous accounts, no world-writable `test` database
            if [ -n "$client" ]; then
                "$client" --no-defaults --socket="$sock" -uroot -e \
                    "DROP USER IF EXISTS ''@'localhost', ''@'$(hostname)'; DROP DATABASE IF EXISTS test;" \
                    >/dev/null 2>&1 || true
            fi
            return 0
        fi
        sleep 0.5
    done
    echo "mariadb.sh: server did not come up in 60 s; tail of $dir/error.log:" >&2
    tail -n 20 "$dir/error.log" >&2 || true
    return 1
}

cycleqd_mariadb_start
