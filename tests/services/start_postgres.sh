#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the sweep tests and print its URL.
#   URL=$(tests/services/start_postgres.sh) && LL_POSTGRES_URL=$URL pytest -m postgres tests/experiments/test_sweep.py
# Installs Debian's `postgresql` with apt-get when missing (needs root), starts (or reuses) a cluster
# listening on loopback only, creates a user and a database. Everything but the URL goes to stderr.
# Env: LL_PG_PORT (5433), LL_PG_USER (ll_sweep), LL_PG_PASSWORD (ll_sweep), LL_PG_DB (ll_sweep),
#      LL_PG_CLUSTER (llsweep).
set -euo pipefail
PORT="${LL_PG_PORT:-5433}"
PGUSER_="${LL_PG_USER:-ll_sweep}"
PGPASS="${LL_PG_PASSWORD:-ll_sweep}"
PGDB="${LL_PG_DB:-ll_sweep}"
CLUSTER="${LL_PG_CLUSTER:-llsweep}"
log() { echo "[start_postgres] $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "installing postgresql (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq postgresql >&2
fi
VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"

as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else sudo -u postgres bash -c "$*"; fi; }

if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$VERSION $CLUSTER"; then
  log "creating cluster $VERSION/$CLUSTER on 127.0.0.1:$PORT"
  $SUDO pg_createcluster "$VERSION" "$CLUSTER" -p "$PORT" -- --auth-local=peer --auth-host=scram-sha-256 >&2
fi
# loopback only (conf.d is included by Debian's postgresql.conf and read last)
$SUDO pg_conftool "$VERSION" "$CLUSTER" remove listen_addresses >&2 || true
echo "listen_addresses = '127.0.0.1'" | $SUDO tee "/etc/postgresql/$VERSION/$CLUSTER/conf.d/ll_sweep.conf" >/dev/null
if ! pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $4}' | grep -q online; then
  log "starting cluster $VERSION/$CLUSTER"
  $SUDO pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
PORT="$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1==v && $2==c {print $3}')"

for _ in $(seq 1 30); do
  if as_pg "psql -p $PORT -Atqc 'select 1'" >/dev/null 2>&1; then break; fi
  sleep 1
done
as_pg "psql -p $PORT -v ON_ERROR_STOP=1 -qc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='$PGUSER_') THEN CREATE ROLE $PGUSER_ LOGIN PASSWORD '$PGPASS'; END IF; END \\\$\\\$;\"" >&2
if ! as_pg "psql -p $PORT -Atqc \"SELECT 1 FROM pg_database WHERE datname='$PGDB'\"" | grep -q 1; then
  as_pg "createdb -p $PORT -O $PGUSER_ $PGDB" >&2
fi
echo "postgresql+psycopg2://$PGUSER_:$PGPASS@127.0.0.1:$PORT/$PGDB"
