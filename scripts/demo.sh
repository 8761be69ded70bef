#!/usr/bin/env bash
# The demo: a control plane on an embedded SQLite file, one agent enrolling and heartbeating, the
# device printed as the REST API shows it, then a command round trip. Runs for DEMO_SECONDS (20).
set -euo pipefail
server=$(realpath target/debug/kernex-server)
agent=$(realpath target/debug/kernex-agent)
work=$(mktemp -d -t kernex-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
export KERNEX_LOG=warn KERNEX_DATA_DIR="$work/data"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "creating tenant 'demo', a bootstrap token and an admin API key (SQLite in $KERNEX_DATA_DIR)"
"$server" tenant create demo
token=$("$server" token create --tenant demo --uses 1 --ttl 1h)
key=$("$server" apikey create --tenant demo --role admin)
echo "bootstrap token id: $(cut -d_ -f2 <<<"$token") (the secret is only in bootstrap.toml)"

step "starting kernex-server (heartbeat interval 3s)"
"$server" serve --listen 127.0.0.1:0 --heartbeat-interval 3s > server.out &
for _ in $(seq 1 100); do grep -q listening server.out 2>/dev/null && break; sleep 0.1; done
cat server.out
url=$(grep -o 'http://[^ ]*' server.out)

step "writing bootstrap.toml and starting kernex-agent (it generates its RSA-4096 key first)"
printf 'server_url = "%s"\ntenant = "demo"\ntoken = "%s"\n' "$url" "$token" > bootstrap.toml
chmod 600 bootstrap.toml
"$agent" run --bootstrap bootstrap.toml --state-dir state 2> agent.log &

api() { curl -fsS -H "Authorization: Bearer $key" "$url/api/v1$1" "${@:2}"; }

step "GET /api/v1/devices as the device appears and heartbeats"
deadline=$((SECONDS + ${DEMO_SECONDS:-20} + 60))
seen=""
beats=0
while [ $SECONDS -lt $deadline ] && [ $beats -lt 4 ]; do
  line=$(api /devices | jq -c '.[] | {id, status, last_heartbeat, agent_version,
           cpu: .telemetry.cpu_percent, mem_free_mib: ((.telemetry.mem_available_bytes // 0) / 1048576 | floor),
           load1: .telemetry.load1}')
  if [ -n "$line" ] && [ "$line" != "$seen" ]; then
    echo "$line"
    seen=$line
    [[ "$line" == *'"status":"online"'* ]] && beats=$((beats + 1))
  fi
  sleep 0.5
done
[ $beats -gt 0 ] || { echo "the device never came online; agent log:" >&2; cat agent.log >&2; exit 1; }

device=$(api /devices | jq -r '.[0].id')
step "queueing a ping command for $device"
command=$(api "/devices/$device/commands" -X POST -H 'content-type: application/json' -d '{"kind":"ping"}' | jq -r .id)
for _ in $(seq 1 60); do
  state=$(api "/devices/$device/commands/$command" | jq -r .state)
  [ "$state" = succeeded ] || [ "$state" = failed ] && break
  sleep 0.5
done
api "/devices/$device/commands/$command" | jq '{kind, state, deliveries, output}'

step "the full device record"
api "/devices/$device" | jq .

step "kernex-agent status"
"$agent" status --state-dir state
