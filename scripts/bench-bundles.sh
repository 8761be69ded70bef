#!/usr/bin/env bash
# Bundle serving and upload, side by side in one run:
#   downloads: kernex-server (SQLite, local store) serves a 256 MiB bundle to 64 concurrent
#   downloaders over loopback, then nginx (Debian, sendfile) serves the same file to the same
#   downloaders (curl, one process each); aggregate throughput, the ratio, and kernex-server's RSS
#   before / at its peak / after (sampled every 100 ms: streaming keeps it flat).
#   upload: a 1 GiB bundle POSTed to kernex-server (streamed to the store while hashed and checked,
#   fsync before it is visible), next to `cp` + `sync` of the same file on the same disk.
#
# Usage: bench-bundles.sh [--size-mib 256] [--clients 64] [--upload-mib 1024]
# Packed bundles are cached in target/bench/ (packing 1 GiB of random data takes a while).
# Writes bench/results/bundles-<UTC time>.md and prints the same table.
set -euo pipefail
size_mib=256; clients=64; upload_mib=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --upload-mib) upload_mib=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
root=$(pwd)
server="$root/target/release/kernex-server"
cache="$root/target/bench"
work=$(mktemp -d -p "$root/target" bench-bundles.XXXXXX)
chmod 755 "$work" # nginx's workers drop to an unprivileged user and must reach its document root
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export KERNEX_LOG=warn
mkdir -p "$cache"

# bundle MIB → path of a packed bundle with MIB of random payload (cached)
bundle() {
  local mib=$1 out="$cache/bundle-$1mib.kxb"
  if [ ! -f "$cache/publisher.pem" ]; then
    "$server" bundle keygen --out "$cache/publisher.pem" >/dev/null
  fi
  if [ ! -f "$out" ]; then
    local src="$cache/src-$mib"
    rm -rf "$src"; mkdir -p "$src"
    printf 'name = "bench%s"\nversion = "1.0.0"\n[scripts]\ninstall = "install.sh"\n' "$mib" > "$src/manifest.toml"
    printf '#!/bin/sh\ntrue\n' > "$src/install.sh"; chmod +x "$src/install.sh"
    head -c "$((mib * 1024 * 1024))" /dev/urandom > "$src/payload.bin"
    echo "packing a $mib MiB bundle (once; cached in $out)" >&2
    "$server" bundle pack "$src" --key "$cache/publisher.pem" --out "$out" >/dev/null
    rm -rf "$src"
  fi
  echo "$out"
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# downloads URL AUTH-HEADER → seconds for $clients concurrent full downloads; fails unless every
# downloader got the whole file (each curl prints the bytes it received)
downloads() {
  local url=$1 auth=$2 start end
  start=$(date +%s.%N)
  seq "$clients" | xargs -P "$clients" -I{} curl -fsS -o /dev/null -w '%{size_download}\n' -H "$auth" "$url" \
    > "$work/sizes" || { echo "a download from $url failed" >&2; return 1; }
  end=$(date +%s.%N)
  local whole
  whole=$(grep -cx "$bytes" "$work/sizes" || true)
  [ "$whole" -eq "$clients" ] || { echo "only $whole of $clients downloads from $url got all $bytes bytes" >&2; return 1; }
  echo "$end - $start" | bc
}

download_file=$(bundle "$size_mib")
upload_file=$(bundle "$upload_mib")
bytes=$(stat -c %s "$download_file")
upload_bytes=$(stat -c %s "$upload_file")

# kernex-server on a fresh SQLite data dir; bundles kept on the same disk as nginx's file
data="$work/data"
"$server" --data-dir "$data" tenant create bench >/dev/null
key=$("$server" --data-dir "$data" apikey create --tenant bench --role admin)
"$server" --data-dir "$data" serve --listen 127.0.0.1:0 --max-bundle-mib $(( (upload_mib > size_mib ? upload_mib : size_mib) + 64 )) > "$work/server.out" &
server_pid=$!; pids+=("$server_pid")
for _ in $(seq 1 200); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
url=$(grep -o 'http://[^ ]*' "$work/server.out")
auth="Authorization: Bearer $key"
curl -fsS -o /dev/null -H "$auth" --data-binary @"$cache/publisher.pub.pem" "$url/api/v1/publisher-keys"

# upload: kernex-server vs cp + sync
start=$(date +%s.%N)
id=$(curl -fsS -H "$auth" -H 'content-type: application/octet-stream' -T "$upload_file" -X POST "$url/api/v1/bundles" | jq -r .id)
upload_s=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
cp "$upload_file" "$work/copy.kxb"; sync "$work/copy.kxb"
cp_s=$(echo "$(date +%s.%N) - $start" | bc)
rm -f "$work/copy.kxb"
[ -n "$id" ] && [ "$id" != null ] || { echo "upload refused" >&2; exit 1; }

# downloads from kernex-server, RSS sampled meanwhile
id=$(curl -fsS -H "$auth" -H 'content-type: application/octet-stream' -T "$download_file" -X POST "$url/api/v1/bundles" | jq -r .id)
idle_rss=$(rss_kib "$server_pid")
( peak=0; while kill -0 "$server_pid" 2>/dev/null && [ ! -f "$work/stop-sampling" ]; do
    r=$(rss_kib "$server_pid"); [ "$r" -gt "$peak" ] && peak=$r; echo "$peak" > "$work/peak"; sleep 0.1
  done ) &
sampler=$!; pids+=("$sampler")
kernex_s=$(downloads "$url/api/v1/bundles/$id/content" "$auth") || exit 1
touch "$work/stop-sampling"; wait "$sampler" 2>/dev/null || true
peak_rss=$(cat "$work/peak"); after_rss=$(rss_kib "$server_pid")

# the same file from nginx
mkdir -p "$work/nginx/www" "$work/nginx/tmp"
ln "$download_file" "$work/nginx/www/bundle.kxb" 2>/dev/null || cp "$download_file" "$work/nginx/www/bundle.kxb"
nginx_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $work/nginx/tmp;
  proxy_temp_path $work/nginx/tmp;
  fastcgi_temp_path $work/nginx/tmp;
  uwsgi_temp_path $work/nginx/tmp;
  scgi_temp_path $work/nginx/tmp;
  server { listen 127.0.0.1:$nginx_port; root $work/nginx/www; }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e stderr &
nginx_pid=$!; pids+=("$nginx_pid")
for _ in $(seq 1 100); do curl -fsS -o /dev/null -r 0-0 "http://127.0.0.1:$nginx_port/bundle.kxb" 2>/dev/null && break; sleep 0.05; done
nginx_s=$(downloads "http://127.0.0.1:$nginx_port/bundle.kxb" "X-Bench: 1") || exit 1

total=$((bytes * clients))
mibs() { echo "scale=0; $1 / 1048576 / $2" | bc; }
kernex_rate=$(mibs "$total" "$kernex_s"); nginx_rate=$(mibs "$total" "$nginx_s")
ratio=$(echo "scale=2; $nginx_s / $kernex_s" | bc)
upload_rate=$(mibs "$upload_bytes" "$upload_s"); cp_rate=$(mibs "$upload_bytes" "$cp_s")
upload_ratio=$(echo "scale=2; $cp_s / $upload_s" | bc)

out="bench/results/bundles-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# Bundle benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "$(nproc) cores; loopback; $clients curl processes at once, each downloading the whole $((bytes / 1048576)) MiB file; server in release mode, local store."
  echo
  echo "| downloads | MiB sent | seconds | MiB/s | ratio to nginx | server RSS idle / peak / after |"
  echo "| --- | --- | --- | --- | --- | --- |"
  echo "| nginx (sendfile) | $((total / 1048576)) | $nginx_s | $nginx_rate | 1.00 | - |"
  echo "| kernex-server | $((total / 1048576)) | $kernex_s | $kernex_rate | $ratio | $((idle_rss / 1024)) / $((peak_rss / 1024)) / $((after_rss / 1024)) MiB |"
  echo
  echo "| upload of $((upload_bytes / 1048576)) MiB | seconds | MiB/s | ratio to cp + sync |"
  echo "| --- | --- | --- | --- |"
  echo "| cp + sync (same disk) | $cp_s | $cp_rate | 1.00 |"
  echo "| kernex-server POST /bundles (hash, verify, fsync) | $upload_s | $upload_rate | $upload_ratio |"
} > "$out"
cat "$out"
echo
echo "written to $out"
