#!/usr/bin/env bash
# Checks the running server against its own OpenAPI document with schemathesis: a real
# kernex-server (debug build) on loopback with a temporary SQLite data dir, seeded with a tenant, an
# admin API key, a bootstrap token, devices that heartbeat, labels, a command, a publisher key, a
# bundle, a deployment and a webhook; then schemathesis fuzzes every operation (and sequences of
# them, following the ids responses carry) with the key as bearer and fails on any 5xx, any status
# the document does not list, and any response body, header or content type off the document.
#
#   scripts/openapi-check.sh [extra schemathesis options]
#
# KERNEX_SERVER_BIN overrides the server binary (default target/debug/kernex-server);
# OPENAPI_MAX_EXAMPLES the examples per operation (default 50). schemathesis is installed into
# target/schemathesis-venv (Debian 12's pip refuses system installs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
server=${KERNEX_SERVER_BIN:-$root/target/debug/kernex-server}
[ -x "$server" ] || { echo "openapi-check: no server binary at $server (cargo build -p kernex-server)" >&2; exit 1; }
for tool in curl jq python3; do
  command -v "$tool" >/dev/null || { echo "openapi-check: \`$tool\` is not installed (./dev test-openapi installs it)" >&2; exit 1; }
done

# Pinned, so that a new schemathesis release never changes what CI checks without a commit.
version=4.32.5
venv=$root/target/schemathesis-venv
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $version"; then
  echo "==> installing schemathesis $version into $venv"
  python3 -m venv "$venv" || { echo "openapi-check: python3 -m venv failed (is python3-venv installed?)" >&2; exit 1; }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

work=$(mktemp -d -t kernex-openapi.XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
export KERNEX_DATA_DIR="$work/data" KERNEX_LOG=warn

echo "==> seeding tenant, admin API key, bootstrap token and devices in $KERNEX_DATA_DIR"
"$server" tenant create acme >/dev/null
key=$("$server" apikey create --tenant acme --role admin --json | jq -er .key)
"$server" token create --tenant acme --uses 5 --ttl 1h --description openapi >/dev/null
"$server" device preauthorize --tenant acme --count 3 --out "$work/devices" >/dev/null

# Rate limits off: schemathesis sends hundreds of requests a second with one key; the limits have
# their own tests.
"$server" serve --listen 127.0.0.1:0 --heartbeat-interval 60s \
  --rate-limit-api-key off --rate-limit-address off --rate-limit-device off --rate-limit-failed-auth off > "$work/server.log" 2>&1 &
server_pid=$!
url=""
for _ in $(seq 1 100); do
  url=$(grep -o 'http://[0-9.:]*' "$work/server.log" | head -1 || true)
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "openapi-check: kernex-server exited:" >&2; cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "openapi-check: kernex-server did not print its address:" >&2; cat "$work/server.log" >&2; exit 1; }
echo "==> kernex-server at $url"

api() { curl -fsS -H "Authorization: Bearer $key" "$url/api/v1$1" "${@:2}"; }
json=(-H 'content-type: application/json')

# Devices with telemetry, VMs and labels; a command on one of them.
n=0
while read -r device token; do
  n=$((n + 1))
  curl -fsS -H "Authorization: Bearer $token" "${json[@]}" "$url/api/v1/heartbeat" -d @- >/dev/null <<EOF
{"agent_version": "0.1.0", "telemetry": {"cpu_percent": 12.5, "mem_total_bytes": 4096, "mem_available_bytes": 1024,
 "disk_total_bytes": 100, "disk_free_bytes": 50, "load1": 0.5, "load5": 0.4, "load15": 0.3, "uptime_s": 60,
 "bundles": {"hello": "1.0.0"}},
 "vms": [{"name": "vm1", "address": "tcp://10.0.0.$n:7070", "connected": true, "state": "connected", "last_seen": 1700000000,
          "rtt_ms": 1.5, "info": {"hostname": "vm1", "os": "Debian", "kernel": "6.1", "uptime_s": 5}}]}
EOF
  api "/devices/$device/labels" -X PUT "${json[@]}" -d '{"labels": {"class": "edge", "site": "s'"$n"'"}}' >/dev/null
  last=$device
done < "$work/devices"
api "/devices/$last/commands" -X POST "${json[@]}" -d '{"kind": "ping"}' >/dev/null

# A publisher key, two versions of a bundle, a deployment to every device.
(
  cd "$work"
  "$server" bundle keygen --out publisher.pem >/dev/null
  for v in 1.0.0 1.1.0; do
    mkdir -p "b$v"
    printf 'name = "hello"\nversion = "%s"\n[scripts]\ninstall = "install.sh"\n' "$v" > "b$v/manifest.toml"
    printf '#!/bin/sh\ntrue\n' > "b$v/install.sh"
    "$server" bundle pack "b$v" --key publisher.pem --out "hello-$v.kxb" >/dev/null
  done
)
api /publisher-keys -X POST --data-binary @"$work/publisher.pub.pem" >/dev/null
api /bundles -X POST -H 'content-type: application/octet-stream' --data-binary @"$work/hello-1.0.0.kxb" >/dev/null
bundle=$(api /bundles -X POST -H 'content-type: application/octet-stream' --data-binary @"$work/hello-1.1.0.kxb" | jq -er .id)
api /deployments -X POST "${json[@]}" -d '{"bundle": "'"$bundle"'", "selector": {"labels": {"class": "edge"}}, "phases": [1, "100%"]}' >/dev/null
# A webhook whose receiver is down (port 9, discard): its delivery log fills with failed attempts.
api /webhooks -X POST "${json[@]}" -d '{"url": "http://127.0.0.1:9/hook", "events": ["*"]}' >/dev/null
api /audit >/dev/null

# Schemathesis follows the ids it reads (GET /apikeys included): the revocation of API keys runs
# last, on its own, or it would revoke the key of the run halfway through.
revoke_keys='^/api/v1/apikeys/\{id\}/revoke$'
fuzz() {
  (
    cd "$work"
    "$venv/bin/schemathesis" run "$url/api/v1/openapi.json" \
      --header "Authorization: Bearer $key" \
      --checks "$checks" \
      --phases examples,coverage,fuzzing,stateful \
      --max-examples "${OPENAPI_MAX_EXAMPLES:-50}" \
      --workers 2 --request-timeout 10 --seed 1 \
      --suppress-health-check all \
      "$@"
  )
}
# Not negative_data_rejection / positive_data_acceptance: the document states types, while the
# server also refuses well-typed values on their meaning (signatures, PEM keys, URLs, thresholds).
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
checks+=,response_headers_conformance,ignored_auth,unsupported_method,missing_required_header
status=0
echo "==> schemathesis $version against $url/api/v1/openapi.json"
fuzz --exclude-path-regex "$revoke_keys" "$@" || status=$?
echo "==> schemathesis: revoking API keys"
fuzz --include-path-regex "$revoke_keys" "$@" || status=$?
kill -0 "$server_pid" 2>/dev/null || { echo "openapi-check: kernex-server died during the run:" >&2; status=1; }
if grep -q "panicked" "$work/server.log"; then
  echo "openapi-check: kernex-server panicked:" >&2
  status=1
fi
if [ $status -ne 0 ]; then
  echo "==> kernex-server log (last 40 lines)" >&2
  tail -40 "$work/server.log" >&2
fi
exit $status
