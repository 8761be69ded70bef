#!/usr/bin/env bash
# Where a heartbeat's CPU goes: one server on SQLite with N seeded devices (rows as wide as enrolled
# ones, as in bench-heartbeat.sh), wrk driving heartbeats, and the CPU each of the server's threads
# used meanwhile (from /proc/<pid>/task/*/stat), per thread name and in µs per heartbeat, beside
# what the whole machine did. Not a benchmark (one target, no no-op beside it): a profile to see
# which side (request handling on the tokio workers, the heartbeat writer, checkpoints) to work on.
#
# Usage: profile-heartbeat.sh [--devices 10000] [--duration 10] [--connections 256] [--server BIN]
set -euo pipefail
devices=10000; duration=10; connections=256; server="$(pwd)/target/release/kernex-server"
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d -t kernex-profile.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export KERNEX_LOG=warn
storage=(--data-dir "$work/data")
"$server" "${storage[@]}" tenant create bench >/dev/null
"$server" "${storage[@]}" device preauthorize --tenant bench --count "$devices" --out "$work/tokens" 2>/dev/null
public_key=$(openssl genrsa 4096 2>/dev/null | openssl rsa -pubout 2>/dev/null)
sqlite3 "$work/data/kernex.db" "UPDATE devices SET public_key = '$public_key',
  facts = '{\"hostname\":\"edge-0042.example.net\",\"os\":\"Ubuntu 24.04.1 LTS\",\"kernel\":\"6.8.0-45-generic\",\"arch\":\"x86_64\",\"agent_version\":\"0.1.0\"}'"
"$server" "${storage[@]}" serve --listen 127.0.0.1:0 --heartbeat-interval 60s \
  --rate-limit-device 1000/s:1000 --rate-limit-address 100000/s:100000 > "$work/server.out" &
pid=$!
for _ in $(seq 1 200); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
url=$(grep -o 'http://[^ ]*' "$work/server.out")

# "tid name utime stime" (clock ticks) for every thread of the server.
threads() { for t in /proc/"$pid"/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14, $15}' "$t/stat")"; done; }
ticks=$(getconf CLK_TCK)
wrk -t1 -c"$connections" -d3s -s bench/heartbeat.lua "$url" -- "$work/tokens" >/dev/null   # warm the caches
threads > "$work/before"; cpu_before=$(head -1 /proc/stat); started=$(date +%s.%N)
wrk -t1 -c"$connections" -d"${duration}s" --latency -s bench/heartbeat.lua "$url" -- "$work/tokens" > "$work/wrk.out"
threads > "$work/after"; cpu_after=$(head -1 /proc/stat); elapsed=$(echo "$(date +%s.%N) - $started" | bc)
rate=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")

echo "$devices devices on SQLite, wrk -c$connections for ${duration}s: $rate heartbeats/s," \
  "p50 $(awk '$1 == "50%" {print $2}' "$work/wrk.out"), p99 $(awk '$1 == "99%" {print $2}' "$work/wrk.out")"
echo
echo "| server threads | user (cores) | sys (cores) | CPU per heartbeat |"
echo "| --- | --- | --- | --- |"
awk -v hz="$ticks" -v s="$elapsed" -v r="$rate" 'NR == FNR {u[$1] = $3; k[$1] = $4; next}
  {U[$2] += $3 - u[$1]; K[$2] += $4 - k[$1]}
  END {for (n in U) if (U[n] + K[n] > 0)
    printf "| %s | %.2f | %.2f | %.1f µs |\n", n, U[n] / hz / s, K[n] / hz / s, (U[n] + K[n]) / hz / s / r * 1e6}' \
  "$work/before" "$work/after" | sort
echo "$cpu_before $cpu_after" | awk -v hz="$ticks" -v s="$elapsed" '{
  printf "\nwhole machine: user %.2f, sys %.2f, idle %.2f, iowait %.2f cores (wrk and the server together)\n",
    ($13 - $2) / hz / s, ($15 - $4) / hz / s, ($16 - $5) / hz / s, ($17 - $6) / hz / s}'
curl -fsS "$url/metrics" | awk '/^kernex_heartbeat_commit_duration_seconds_(sum|count)/ {v[$1] = $2}
  END {c = v["kernex_heartbeat_commit_duration_seconds_count"]; if (c > 0)
    printf "heartbeat commits: %d, %.2f ms each on average (warm-up included)\n", c, v["kernex_heartbeat_commit_duration_seconds_sum"] / c * 1000}'
