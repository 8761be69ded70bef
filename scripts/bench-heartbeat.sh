#!/usr/bin/env bash
# Heartbeat throughput of kernex-server on SQLite and PostgreSQL for N simulated devices, side by side
# with a no-op axum endpoint on the same machine, in one run. Devices are seeded by
# `kernex-server device preauthorize` (real device rows, real HMAC bearer tokens); wrk drives
# heartbeats round-robin over all of them. Enrollment (RSA signature check) is measured separately.
#
# Usage: bench-heartbeat.sh [--devices "10000 100000"] [--duration 10] [--connections 256] [--backends "sqlite postgres"]
# Writes bench/results/heartbeat-<UTC time>.md and prints the same table.
set -euo pipefail
devices="10000 100000"; duration=10; connections=256; backends="sqlite postgres"
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --backends) backends=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
root=$(pwd)
server="$root/target/release/kernex-server"
bench="$root/target/release/kernex-bench"
work=$(mktemp -d -t kernex-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export KERNEX_LOG=warn

pg_admin=""
if [[ " $backends " == *" postgres "* ]]; then pg_admin=$(scripts/postgres.sh); fi

# start_server OUTFILE ARGS... → sets $url and $pid
start() {
  local out=$1; shift
  "$@" > "$out" &
  pid=$!; pids+=("$pid")
  for _ in $(seq 1 200); do grep -q listening "$out" 2>/dev/null && break; sleep 0.05; done
  url=$(grep -o 'http://[^ ]*' "$out")
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# run_wrk SCRIPT URL ARG → "ok_per_s p50_ms p99_ms non2xx"
run_wrk() {
  local out
  out=$(wrk -t1 -c"$connections" -d"${duration}s" --latency -s "$1" "$2" -- "$3")
  local total secs non2xx p50 p99
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  secs=$(awk '/requests in/ {gsub(/s,/, "", $4); print $4}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out"); non2xx=${non2xx:-0}
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$(( (total - non2xx) * 100 / ${secs%.*}00 * 1 ))" "$p50" "$p99" "$non2xx" | awk -v t="$total" -v s="$secs" -v n="$non2xx" -v a="$p50" -v b="$p99" '{printf "%.0f %s %s %d\n", (t - n) / s, a, b, n}'
}

# The no-op ceiling is measured right before each target, so a shared machine's drift over the run
# does not land in the ratio.
noop_tokens="$work/noop-tokens"; echo "x kxnoop" > "$noop_tokens"
measure_noop() {
  start "$work/noop.out" "$bench" noop
  local noop_pid=$pid
  read -r noop_rate noop_p50 noop_p99 _ <<<"$(run_wrk bench/heartbeat.lua "$url" "$noop_tokens")"
  noop_rss=$(rss_kib "$noop_pid")
  kill "$noop_pid"; wait "$noop_pid" 2>/dev/null || true
  rows+=("| no-op axum endpoint | - | $noop_rate | $noop_p50 | $noop_p99 | 0 | $((noop_rss / 1024)) MiB | - | 1.00 |")
}

# Pre-authorized rows have no key yet; an enrolled device's row carries its RSA-4096 public key
# (PEM, about 800 bytes) and its facts. The seeded rows are widened to that, so the database is
# the size a real fleet's is.
public_key=$(openssl genrsa 4096 2>/dev/null | openssl rsa -pubout 2>/dev/null)
facts='{"hostname":"edge-0042.example.net","os":"Ubuntu 24.04.1 LTS","kernel":"6.8.0-45-generic","arch":"x86_64","agent_version":"0.1.0"}'
widen() {
  local sql="UPDATE devices SET public_key = '$public_key', facts = '$facts'"
  case "$1" in
    sqlite) sqlite3 "$2/data/kernex.db" "$sql" ;;
    postgres) psql "${pg_admin%/*}/$3" -qc "$sql" -qc "VACUUM ANALYZE" -qc "CHECKPOINT" >/dev/null ;;
  esac
}

rows=()
declare -A after_rss
marginals=()
for backend in $backends; do
  previous_n=""
  for n in $devices; do
    dir="$work/$backend-$n"; mkdir -p "$dir"; db=""
    storage=(--data-dir "$dir/data")
    if [ "$backend" = postgres ]; then
      db="kx_bench_$n"
      psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -qc "CREATE DATABASE $db" >/dev/null
      storage+=(--database "${pg_admin%/*}/$db")
    fi
    "$server" "${storage[@]}" tenant create bench >/dev/null
    seed_start=$(date +%s.%N)
    "$server" "${storage[@]}" device preauthorize --tenant bench --count "$n" --out "$dir/tokens" 2>/dev/null
    seed_s=$(echo "$(date +%s.%N) - $seed_start" | bc)
    widen "$backend" "$dir" "$db"
    # Each target starts on a quiet disk: what the seeding and the previous target wrote is on it
    # (a run after SQLite's 100k devices otherwise shared the disk with their write-back).
    sync
    measure_noop
    # Simulated devices beat far faster than real ones (10k devices at 40k/s) and enrollment is
    # replayed from one address: limits raised, not removed, so the limiter's cost is measured.
    start "$dir/server.out" "$server" "${storage[@]}" serve --listen 127.0.0.1:0 --heartbeat-interval 60s \
      --rate-limit-device 1000/s:1000 --rate-limit-address 100000/s:100000
    server_pid=$pid
    idle_rss=$(rss_kib "$server_pid")
    read -r rate p50 p99 non2xx <<<"$(run_wrk bench/heartbeat.lua "$url" "$dir/tokens")"
    rss=$(rss_kib "$server_pid")
    ratio=$(echo "scale=2; $rate / $noop_rate" | bc)
    per_device=$(echo "scale=1; ($rss - $idle_rss) * 1024 / $n" | bc)
    # The cost of one more device, free of what any server holds for its connections and buffers
    # whatever the fleet: the growth of RSS between two fleet sizes.
    after_rss[$backend-$n]=$rss
    if [ -n "$previous_n" ]; then
      marginal=$(echo "scale=1; ($rss - ${after_rss[$backend-$previous_n]}) * 1024 / ($n - $previous_n)" | bc)
      marginals+=("$backend: $marginal B per device from $previous_n to $n devices")
    fi
    previous_n=$n
    rows+=("| kernex-server $backend | $n | $rate | $p50 | $p99 | $non2xx | $((rss / 1024)) MiB | $per_device B | $ratio |")
    seeds+=("$backend $n devices seeded in ${seed_s%???????} s")
    if [ "$n" = "${devices%% *}" ]; then
      token=$("$server" "${storage[@]}" token create --tenant bench)
      "$bench" enroll-body --tenant bench --token "$token" --out "$dir/enroll"
      curl -fsS -o /dev/null -X POST -H 'content-type: application/json' \
        -H "kernex-signature: $(cat "$dir/enroll/signature")" --data-binary @"$dir/enroll/body.json" "$url/api/v1/enroll"
      read -r erate ep50 ep99 enon <<<"$(run_wrk bench/enroll.lua "$url" "$dir/enroll")"
      enrolls+=("| $backend | $erate | $ep50 | $ep99 | $enon |")
    fi
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
    rm -rf "$dir/data"
    if [ -n "$db" ]; then psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null; fi
  done
done

out="bench/results/heartbeat-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# Heartbeat benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "$(nproc) cores, wrk -t1 -c$connections -d${duration}s on loopback; server in release mode; SQLite synchronous=FULL."
  echo "Device rows as wide as enrolled ones (RSA-4096 public key, facts); heartbeats round robin over all devices."
  echo "RSS per device = (RSS after the run - RSS at start) / devices. Each ratio is to the no-op row just above it."
  echo
  echo "| target | devices | heartbeats/s (2xx) | p50 | p99 | non-2xx | server RSS | RSS per device | ratio to no-op |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  if [ ${#marginals[@]} -gt 0 ]; then
    echo "Marginal server memory (RSS after the larger run - RSS after the smaller, / added devices):"
    echo
    printf -- '- %s\n' "${marginals[@]}"
    echo
  fi
  echo "Enrollment (replayed signed body, idempotent path: RSA-4096 verification + lookups):"
  echo
  echo "| backend | enrollments/s | p50 | p99 | non-2xx |"
  echo "| --- | --- | --- | --- | --- |"
  printf '%s\n' "${enrolls[@]}"
  echo
  printf -- '- %s\n' "${seeds[@]}"
} > "$out"
cat "$out"
echo
echo "written to $out"
