#!/usr/bin/env bash
# Heartbeat throughput of kernex-server on SQLite and PostgreSQL for N simulated devices, side by side
# with a no-op axum endpoint on the same machine, in one run. Devices are seeded by
# `kernex-server device preauthorize` (real device rows, real HMAC bearer tokens); wrk drives
# heartbeats round robin over all of them. Enrollment (RSA signature check) is measured separately.
#
# This machine's speed drifts by tens of percent within a minute, so each target is measured in
# rounds, each a no-op run right before a heartbeat run: a round's ratio compares two runs seconds
# apart, and the table gives the median round (and every round's ratio beside it).
#
# Usage: bench-heartbeat.sh [--devices "10000 100000"] [--duration 10] [--rounds 3] [--connections 256]
#                           [--backends "sqlite postgres"]
# Writes bench/results/heartbeat-<UTC time>.md and prints the same table.
set -euo pipefail
devices="10000 100000"; duration=10; rounds=3; connections=256; backends="sqlite postgres"
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) devices=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
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
  wrk -t1 -c"$connections" -d"${duration}s" --latency -s "$1" "$2" -- "$3" | awk '
    # wrk prints latencies as 950.12us, 6.54ms or 1.02s
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /requests in/ { total = $1; secs = $4; sub(/s,$/, "", secs) }
    /Non-2xx/ { non2xx = $5 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    END { printf "%.0f %.2f %.2f %d\n", (total - non2xx) / secs, p50, p99, non2xx }'
}

# The no-op ceiling: one server for the whole run, measured right before each heartbeat run.
noop_tokens="$work/noop-tokens"; echo "x kxnoop" > "$noop_tokens"
start "$work/noop.out" "$bench" noop
noop_url=$url

# median VALUES... → the middle value (the lower middle of an even count)
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

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
    # Simulated devices beat far faster than real ones (10k devices at 40k/s) and enrollment is
    # replayed from one address: limits raised, not removed, so the limiter's cost is measured.
    start "$dir/server.out" "$server" "${storage[@]}" serve --listen 127.0.0.1:0 --heartbeat-interval 60s \
      --rate-limit-device 1000/s:1000 --rate-limit-address 100000/s:100000
    server_pid=$pid
    idle_rss=$(rss_kib "$server_pid")
    round_rates=(); round_noops=(); round_ratios=(); round_p50s=(); round_p99s=(); non2xx_total=0
    for _ in $(seq 1 "$rounds"); do
      read -r noop_rate _ <<<"$(run_wrk bench/heartbeat.lua "$noop_url" "$noop_tokens")"
      read -r rate p50 p99 non2xx <<<"$(run_wrk bench/heartbeat.lua "$url" "$dir/tokens")"
      round_noops+=("$noop_rate"); round_rates+=("$rate")
      round_ratios+=("$(echo "scale=2; $rate / $noop_rate" | bc | sed 's/^\./0./')")
      round_p50s+=("$p50"); round_p99s+=("$p99"); non2xx_total=$((non2xx_total + non2xx))
    done
    rss=$(rss_kib "$server_pid")
    per_device=$(echo "scale=1; ($rss - $idle_rss) * 1024 / $n" | bc)
    # The cost of one more device, free of what any server holds for its connections and buffers
    # whatever the fleet: the growth of RSS between two fleet sizes.
    after_rss[$backend-$n]=$rss
    if [ -n "$previous_n" ]; then
      marginal=$(echo "scale=1; ($rss - ${after_rss[$backend-$previous_n]}) * 1024 / ($n - $previous_n)" | bc)
      marginals+=("$backend: $marginal B per device from $previous_n to $n devices")
    fi
    previous_n=$n
    rows+=("| $backend | $n | $(median "${round_rates[@]}") | $(median "${round_noops[@]}") | **$(median "${round_ratios[@]}")** | ${round_ratios[*]} | $(median "${round_p50s[@]}") ms | $(median "${round_p99s[@]}") ms | $non2xx_total | $((rss / 1024)) MiB | $per_device B |")
    seeds+=("$backend $n devices seeded in ${seed_s%???????} s")
    if [ "$n" = "${devices%% *}" ]; then
      token=$("$server" "${storage[@]}" token create --tenant bench)
      "$bench" enroll-body --tenant bench --token "$token" --out "$dir/enroll"
      curl -fsS -o /dev/null -X POST -H 'content-type: application/json' \
        -H "kernex-signature: $(cat "$dir/enroll/signature")" --data-binary @"$dir/enroll/body.json" "$url/api/v1/enroll"
      read -r erate ep50 ep99 enon <<<"$(run_wrk bench/enroll.lua "$url" "$dir/enroll")"
      enrolls+=("| $backend | $erate | $ep50 ms | $ep99 ms | $enon |")
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
  echo "$rounds rounds per target, each a no-op run then a heartbeat run; each figure is the median of the rounds',"
  echo "the ratio the median of the rounds' ratios (each round's listed). RSS per device = (RSS after the rounds - RSS at start) / devices."
  echo
  echo "| backend | devices | heartbeats/s (2xx) | no-op/s | ratio to no-op | ratio per round | p50 | p99 | non-2xx | server RSS | RSS per device |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
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
