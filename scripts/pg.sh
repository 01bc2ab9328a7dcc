#!/usr/bin/env bash
# Start (or stop) a throw-away PostgreSQL server on a loopback port for the tests.
#   source scripts/pg.sh start   -> exports FS_TEST_POSTGRES_URL
#   scripts/pg.sh stop
# Uses Debian's postgresql package; PostgreSQL refuses to run as root, so the
# server runs as the `postgres` user with its data in a temp folder.
set -u
PGPORT=${FS_PG_PORT:-54329}
PGDATA_DIR=${FS_PG_DATA:-/tmp/featurestore-pg-$PGPORT}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)

_as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

pg_start() {
  if [ -z "$PGBIN" ]; then
    echo "PostgreSQL is not installed (apt-get install postgresql); PostgreSQL tests will be skipped" >&2
    return 0
  fi
  if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
    rm -rf "$PGDATA_DIR"; mkdir -p "$PGDATA_DIR"
    [ "$(id -u)" = 0 ] && chown postgres "$PGDATA_DIR"
    _as_pg "'$PGBIN/initdb' -D '$PGDATA_DIR' -U postgres --auth=trust >/dev/null"
  fi
  if ! _as_pg "'$PGBIN/pg_ctl' -D '$PGDATA_DIR' status >/dev/null 2>&1"; then
  _as_pg "'$PGBIN/pg_ctl' -D '$PGDATA_DIR' -l '$PGDATA_DIR/server.log' -w -o \"-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off\" start >/dev/null" \
    || { cat "$PGDATA_DIR/server.log" >&2; return 1; }
  fi
  export FS_TEST_POSTGRES_URL="postgresql+psycopg2://postgres@127.0.0.1:$PGPORT/postgres"
  echo "PostgreSQL running on 127.0.0.1:$PGPORT" >&2
}

pg_stop() {
  [ -n "$PGBIN" ] && [ -f "$PGDATA_DIR/postmaster.pid" ] && \
    _as_pg "'$PGBIN/pg_ctl' -D '$PGDATA_DIR' -m fast stop >/dev/null"
  return 0
}

case "${1:-}" in
  start) pg_start ;;
  stop) pg_stop ;;
  *) echo "usage: source scripts/pg.sh start | scripts/pg.sh stop" >&2 ;;
esac
