#!/usr/bin/env bash
# Starts the local PostgreSQL cluster (Debian's) and makes sure role `kernex` (password `kernex`,
# allowed to create databases) exists. Prints the admin URL tests use: each test creates and drops
# its own database through it.
set -euo pipefail
cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
if [ -z "$cluster" ]; then
  echo "no PostgreSQL cluster found (is the postgresql package installed?)" >&2
  exit 1
fi
# shellcheck disable=SC2086
if ! pg_lsclusters --no-header | awk 'NR==1 {print $4}' | grep -q online; then
  pg_ctlcluster $cluster start >&2
fi
port=$(pg_lsclusters --no-header | awk 'NR==1 {print $3}')
for _ in $(seq 1 50); do
  runuser -u postgres -- psql -p "$port" -qtAc 'SELECT 1' >/dev/null 2>&1 && break
  sleep 0.2
done
runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -qc "
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kernex') THEN
    CREATE ROLE kernex LOGIN PASSWORD 'kernex' CREATEDB;
  END IF;
END \$\$;
-- The heartbeat benchmark checkpoints before each run, so none falls into it.
GRANT pg_checkpoint TO kernex;" >&2
echo "postgres://kernex:kernex@127.0.0.1:${port}/postgres"
