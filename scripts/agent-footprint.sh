#!/usr/bin/env bash
# Idle RSS of the agent: enrolls it against a throw-away server, waits for two heartbeats, reads
# VmRSS from /proc. Usage: agent-footprint.sh PATH-TO-kernex-agent
set -euo pipefail
agent=$(realpath "$1")
server=$(realpath target/debug/kernex-server 2>/dev/null || true)
[ -x "$server" ] || { cargo build -q -p kernex-server; server=$(realpath target/debug/kernex-server); }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"
export KERNEX_LOG=warn
"$server" --data-dir data tenant create footprint >/dev/null
token=$("$server" --data-dir data token create --tenant footprint)
"$server" --data-dir data serve --listen 127.0.0.1:0 --heartbeat-interval 1s > server.out &
for _ in $(seq 1 100); do grep -q listening server.out 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'http://[^ ]*' server.out)
printf 'server_url = "%s"\ntenant = "footprint"\ntoken = "%s"\n' "$url" "$token" > bootstrap.toml
"$agent" run --bootstrap bootstrap.toml --state-dir state --hardware-id footprint 2> agent.err &
pid=$!
for _ in $(seq 1 600); do
  [ "$(jq -r '.last_heartbeat_at // empty' state/state.json 2>/dev/null)" != "" ] && break
  sleep 0.1
done
sleep 2.5
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
echo "kernex-agent idle RSS after heartbeats: ${rss} KiB"
