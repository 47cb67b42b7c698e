#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the tests (Debian's postgresql package): a new cluster in
# a temporary folder, listening on a unix socket there and on a free loopback port, trusted local
# logins. Prints the lines to eval, e.g.
#
#   eval "$(bash scripts/start-postgres.sh)"   # sets ARBITER_TEST_PG and ARBITER_PG_DIR
#   ...
#   bash scripts/start-postgres.sh --stop "$ARBITER_PG_DIR"
#
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user (made
# by the package), which owns the folder.
set -euo pipefail

bin=""
for dir in /usr/lib/postgresql/*/bin; do [[ -x "$dir/pg_ctl" ]] && bin="$dir"; done
if [[ -z "$bin" ]]; then
  echo "start-postgres: no PostgreSQL server found (install it with scripts/install-deps.sh)" >&2
  exit 1
fi

as_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ "${1:-}" == "--stop" ]]; then
  dir="${2:?usage: start-postgres.sh --stop DIR}"
  [[ -f "$dir/data/PG_VERSION" ]] || { echo "start-postgres: $dir holds no cluster" >&2; exit 1; }
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi

dir=$(mktemp -d /tmp/arbiter-pg.XXXXXX)
chmod 755 "$dir"
[[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
  cat "$dir/initdb.log" >&2
  exit 1
}
# A free loopback port (the kernel's pick, released just before the server binds it).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Tests make and drop many databases and run many connections; durability is not what they test,
# but fsync stays on so that kill -9 tests see what a real server would keep.
as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=300" start >/dev/null || {
  cat "$dir/server.log" >&2
  exit 1
}
echo "export ARBITER_TEST_PG=postgresql://postgres@127.0.0.1:$port/postgres"
echo "export ARBITER_PG_DIR=$dir"
