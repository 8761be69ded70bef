#!/usr/bin/env bash
# Starts a single-node Garage (an S3-compatible object store) on loopback for the S3 bundle-store
# tests, or reuses the one this script started before. Data, metadata, config and log live in
# target/garage (or $KERNEX_GARAGE_DIR). Prints the settings the tests read, as shell lines for
# `eval "$(scripts/garage.sh)"`:
#
#   export KERNEX_TEST_S3=http://127.0.0.1:PORT     the S3 endpoint
#   export KERNEX_TEST_S3_REGION=garage
#   export KERNEX_TEST_S3_BUCKET=kernex-test
#   export AWS_ACCESS_KEY_ID=GK...                  a key allowed to read and write that bucket
#   export AWS_SECRET_ACCESS_KEY=...
#
# `scripts/garage.sh stop` stops it (the data stays; the next start reuses it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${KERNEX_GARAGE_DIR:-$repo/target/garage}
garage_bin=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
bucket=kernex-test
key_name=kernex-test
region=garage
config=$dir/garage.toml
pidfile=$dir/garage.pid

log() { echo "garage.sh: $*" >&2; }
die() { log "$*"; exit 1; }
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
g() { "$garage_bin" -c "$config" "$@"; }
port_free() { [ -z "$(ss -Hltn "sport = :$1")" ]; }
free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 30000))
    if port_free "$port"; then echo "$port"; return; fi
  done
  die "no free loopback port found"
}
config_port() { sed -n "/^\[$1\]/,/^\[/s/^api_bind_addr = \"127.0.0.1:\([0-9]*\)\"/\1/p" "$config"; }

[ -x "$garage_bin" ] || die "garage not found (looked for $garage_bin): install it with \`cargo install garage --locked\` or run \`./dev test-s3\`"

if [ "${1:-}" = stop ]; then
  if running; then
    kill "$(cat "$pidfile")"
    log "stopped garage (pid $(cat "$pidfile"))"
  fi
  rm -f "$pidfile"
  exit 0
fi

mkdir -p "$dir/meta" "$dir/data"
if ! running; then
  # A config from an earlier run is kept (the node id and cluster layout belong to its metadata),
  # unless one of its ports is taken meanwhile: then it gets new ports.
  reuse=false
  if [ -f "$config" ]; then
    reuse=true
    for section in s3_api admin; do
      port=$(config_port "$section")
      if [ -z "$port" ] || ! port_free "$port"; then reuse=false; fi
    done
    rpc=$(sed -n 's/^rpc_bind_addr = "127.0.0.1:\([0-9]*\)"/\1/p' "$config")
    if [ -z "$rpc" ] || ! port_free "$rpc"; then reuse=false; fi
  fi
  if ! $reuse; then
    secret=$(grep -s '^rpc_secret' "$config" | cut -d'"' -f2 || true)
    [ -n "$secret" ] || secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
    rpc=$(free_port)
    s3=$(free_port)
    admin=$(free_port)
    while [ "$s3" = "$rpc" ]; do s3=$(free_port); done
    while [ "$admin" = "$rpc" ] || [ "$admin" = "$s3" ]; do admin=$(free_port); done
    umask 077
    cat >"$config" <<EOF
# Written by scripts/garage.sh: a single-node Garage on loopback for tests.
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "$region"
api_bind_addr = "127.0.0.1:$s3"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
  fi
  log "starting garage ($("$garage_bin" --version 2>/dev/null | head -1)) with $config, log in $dir/garage.log"
  RUST_LOG=${RUST_LOG:-garage=warn} setsid "$garage_bin" -c "$config" server >>"$dir/garage.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
fi

for _ in $(seq 1 100); do
  g status >/dev/null 2>&1 && break
  running || die "garage exited; see $dir/garage.log"
  sleep 0.1
done
g status >/dev/null 2>&1 || die "garage does not answer \`garage status\`; see $dir/garage.log"

# One node holding every partition. `layout show` lists roles as "<id prefix> <tags> <zone> ...".
# (Outputs are captured before matching: with pipefail, `grep -q` closing a pipe early fails it.)
node=$(g node id -q)
node=${node%@*}
layout=$(g layout show 2>/dev/null)
if ! grep -q "^${node:0:16} .*dc1" <<<"$layout"; then
  log "assigning the layout to node ${node:0:16}"
  g layout assign -z dc1 -c 10G "$node" >/dev/null
  version=$(sed -n 's/.*layout version: *\([0-9]*\).*/\1/Ip' <<<"$layout")
  g layout apply --version $((${version:-0} + 1)) >/dev/null
fi

if ! g key info "$key_name" >/dev/null 2>&1; then
  log "creating key $key_name"
  g key create "$key_name" >/dev/null
fi
if ! g bucket info "$bucket" >/dev/null 2>&1; then
  log "creating bucket $bucket"
  g bucket create "$bucket" >/dev/null
fi
g bucket allow --read --write --owner "$bucket" --key "$key_name" >/dev/null

key=$(g json-api GetKeyInfo "{\"search\": \"$key_name\", \"showSecretKey\": true}")
key_id=$(jq -r .accessKeyId <<<"$key")
key_secret=$(jq -r .secretAccessKey <<<"$key")
[ -n "$key_id" ] && [ "$key_secret" != null ] || die "could not read key $key_name: $key"
endpoint="http://127.0.0.1:$(config_port s3_api)"

# Ready when a signed request would be served: until the layout is live, Garage answers 503.
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/$bucket" || true)
  [ "$code" = 403 ] && break
  sleep 0.1
done
[ "$code" = 403 ] || die "the S3 API at $endpoint does not answer (HTTP $code); see $dir/garage.log"

echo "export KERNEX_TEST_S3=$endpoint"
echo "export KERNEX_TEST_S3_REGION=$region"
echo "export KERNEX_TEST_S3_BUCKET=$bucket"
echo "export AWS_ACCESS_KEY_ID=$key_id"
echo "export AWS_SECRET_ACCESS_KEY=$key_secret"
