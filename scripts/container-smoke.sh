#!/usr/bin/env bash
# Builds deploy/Containerfile with podman and runs the image, with no container registry:
#   1. the base stage's Debian 12 comes from `debootstrap --variant=minbase bookworm` (the Debian
#      mirror only), imported once as $base_image (kept as a cache; `podman rmi` it to refresh);
#      the build's `apt-get update` reaches the same mirror from inside the build
#   2. `podman build --build-arg BASE_IMAGE=$base_image` of the static musl server
#      (`just server-static` first)
#   3. the image run with a named volume on /var/lib/kernex and the port published on loopback:
#      GET /healthz and /readyz are 200, the server runs as uid 65532, `podman exec ... tenant
#      create` and `apikey create` work, the API key lists devices from the host (200, []), a
#      graceful stop exits 0, and the tenant is still there for a new container on the volume
# Prints the figures (image size, build time, time to healthy). Removes its container, volume and
# image on exit, whatever happens; keeps $base_image and podman's cached first stage (dropped by
# `podman image prune`), so later runs need neither debootstrap nor the mirror.
#
# Environment: KERNEX_DEBIAN_MIRROR (http://deb.debian.org/debian), KERNEX_DEBIAN_SECURITY_MIRROR
# (http://deb.debian.org/debian-security), KERNEX_PODMAN_RUNTIME (podman's default, or runc where
# crun cannot run, see below), KERNEX_SMOKE_TIMEOUT (seconds to wait for /healthz, 30),
# KERNEX_SMOKE_KEEP_IMAGE=1 to keep localhost/kernex-server:smoke.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/x86_64-unknown-linux-musl/release/kernex-server
base_image=localhost/kernex-debian:bookworm-minbase
image=localhost/kernex-server:smoke
name=kernex-smoke-$$
volume=kernex-smoke-$$
mirror=${KERNEX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${KERNEX_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
timeout_s=${KERNEX_SMOKE_TIMEOUT:-30}

step() { printf '==> %s\n' "$*"; }
die() { echo "container-smoke: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
now_ms() { date +%s%3N; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }

rootfs=""
started=""
cleanup() {
  local rc=$?
  set +e
  if [ -n "$started" ]; then
    if [ "$rc" != 0 ] && "${podman[@]}" container exists "$name"; then
      echo "--- podman logs $name (last 40 lines) ---" >&2
      "${podman[@]}" logs --tail 40 "$name" >&2
      echo "--- state: $("${podman[@]}" inspect --format '{{.State.Status}} (exit code {{.State.ExitCode}})' "$name") ---" >&2
    fi
    "${podman[@]}" rm -f -t 10 "$name" >/dev/null 2>&1
    "${podman[@]}" volume rm -f "$volume" >/dev/null 2>&1
    [ "${KERNEX_SMOKE_KEEP_IMAGE:-}" = 1 ] || "${podman[@]}" rmi "$image" >/dev/null 2>&1
  fi
  [ -z "$rootfs" ] || as_root rm -rf "$rootfs"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v podman >/dev/null || die "podman is not installed (Debian package podman; ./dev container-run installs it)"
command -v curl >/dev/null || die "curl is not installed"
[ -x "$bin" ] || die "$bin does not exist: run \`just server-static\` first"
file "$bin" | grep -q static || die "$bin is not static"

podman=(podman)
# crun (podman's default runtime on Debian) refuses a cgroup v1 host whose v2 hierarchy still holds
# controllers ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), as in
# the VM this was written on; runc runs there.
runtime=${KERNEX_PODMAN_RUNTIME:-}
v2_controllers=$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || true)
if [ -z "$runtime" ] && [ -n "$v2_controllers" ] \
   && [ "$(podman info --format '{{.Host.OCIRuntime.Name}}')" = crun ]; then
  command -v runc >/dev/null || die "crun cannot run containers on this hybrid cgroup host (controllers in /sys/fs/cgroup/unified: $v2_controllers); install runc (Debian package runc)"
  runtime=runc
fi
[ -z "$runtime" ] || podman+=(--runtime "$runtime")

# podman gives containers nofile and nproc limits of 1048576, which a process without
# CAP_SYS_RESOURCE cannot set above its own hard limits ("setrlimit RLIMIT_NOFILE: Operation not
# permitted"); podman lowers its own nproc to 32768. Run with what the caller has instead.
hard_limit() { local v; v=$(ulimit -H "$1"); [ "$v" = unlimited ] && v=$2; echo $((v < $2 ? v : $2)); }
nofile=$(hard_limit -n 1048576)
nproc=$(hard_limit -u 32768)
run_opts=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

t_start=$(now_ms)
started=1

if "${podman[@]}" image exists "$base_image"; then
  step "base image $base_image present (podman rmi it to rebuild it)"
  base_ms=0
else
  command -v debootstrap >/dev/null || die "debootstrap is not installed (Debian package debootstrap)"
  step "building $base_image: debootstrap --variant=minbase bookworm from $mirror"
  t0=$(now_ms)
  rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/kernex-rootfs.XXXXXX")
  log=$rootfs.log
  if ! as_root timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$log" 2>&1; then
    tail -20 "$log" >&2
    die "debootstrap failed (full log: $log)"
  fi
  rm -f "$log"
  # The suites of docker.io/library/debian:12-slim; what the build's `apt-get update` reads.
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
    "$mirror" "$mirror" "$security_mirror" | as_root tee "$rootfs/etc/apt/sources.list" >/dev/null
  as_root find "$rootfs/var/cache/apt/archives" "$rootfs/var/lib/apt/lists" -type f -delete
  as_root tar -C "$rootfs" --numeric-owner -c . \
    | "${podman[@]}" import --quiet \
        --change 'LABEL org.opencontainers.image.description="Debian 12 minbase (debootstrap), a local stand-in for docker.io/library/debian:12-slim"' \
        --change 'CMD ["/bin/bash"]' - "$base_image" >/dev/null \
    || die "podman import of the debootstrapped tree failed"
  as_root rm -rf "$rootfs"
  rootfs=""
  base_ms=$(($(now_ms) - t0))
  step "$base_image built in $(secs "$base_ms")"
fi

step "podman build -f deploy/Containerfile --build-arg BASE_IMAGE=$base_image -t $image"
t0=$(now_ms)
timeout 600 "${podman[@]}" build --pull=never --build-arg "BASE_IMAGE=$base_image" \
  -f deploy/Containerfile -t "$image" . >"target/container-build.log" 2>&1 \
  || { tail -20 target/container-build.log >&2; die "podman build failed (full log: target/container-build.log)"; }
build_ms=$(($(now_ms) - t0))
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
user=$("${podman[@]}" image inspect --format '{{.Config.User}}' "$image")
[ "$user" = 65532:65532 ] || die "the image's USER is '$user', not 65532:65532"

step "podman run -d -p 127.0.0.1::8080 -v $volume:/var/lib/kernex $image"
t0=$(now_ms)
"${podman[@]}" run -d --name "$name" "${run_opts[@]}" -p 127.0.0.1::8080 \
  -v "$volume:/var/lib/kernex" "$image" >/dev/null \
  || die "podman run failed"
hostport=$("${podman[@]}" port "$name" 8080/tcp | head -1)
[ -n "$hostport" ] || die "podman published no host port for 8080/tcp"
url="http://127.0.0.1:${hostport##*:}"

deadline=$((SECONDS + timeout_s))
until curl -fsS --max-time 2 -o /dev/null "$url/healthz" 2>/dev/null; do
  [ "$("${podman[@]}" inspect --format '{{.State.Running}}' "$name")" = true ] \
    || die "the container exited before answering GET /healthz"
  [ $SECONDS -lt $deadline ] || die "GET $url/healthz did not answer 200 within ${timeout_s}s"
  sleep 0.1
done
healthy_ms=$(($(now_ms) - t0))
until [ "$(curl -sS --max-time 2 -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ]; do
  [ $SECONDS -lt $deadline ] || die "GET $url/readyz did not answer 200 within ${timeout_s}s: $(curl -sS --max-time 2 "$url/readyz")"
  sleep 0.1
done
ready_ms=$(($(now_ms) - t0))
echo "GET /healthz 200 after $(secs "$healthy_ms"), GET /readyz 200 after $(secs "$ready_ms"): $(curl -fsS --max-time 2 "$url/readyz")"

# USER is the uid inside the container, HUSER the one on the host (the same for rootful podman).
top=$("${podman[@]}" top "$name" user huser args | tail -n +2)
read -r ctr_uid host_uid _ <<<"$top"
[ "$ctr_uid" = 65532 ] || die "kernex-server runs as uid $ctr_uid in the container, not 65532: $top"
echo "process: uid $ctr_uid in the container, $host_uid on the host: $(awk '{ $1 = $2 = ""; print substr($0, 3) }' <<<"$top")"

"${podman[@]}" exec "$name" kernex-server tenant create acme || die "podman exec ... tenant create acme failed"
key=$("${podman[@]}" exec "$name" kernex-server apikey create --tenant acme --role admin) \
  || die "podman exec ... apikey create failed"
devices=$(curl -sS --max-time 5 -w ' %{http_code}' -H "Authorization: Bearer $key" "$url/api/v1/devices")
[ "$devices" = "[] 200" ] || die "GET /api/v1/devices with the new API key answered '$devices', not '[] 200'"
anonymous=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "$url/api/v1/devices")
[ "$anonymous" = 401 ] || die "GET /api/v1/devices without a key answered $anonymous, not 401"
echo "GET /api/v1/devices: 200 [] with the API key, 401 without"

t0=$(now_ms)
"${podman[@]}" stop -t 10 "$name" >/dev/null
stop_ms=$(($(now_ms) - t0))
code=$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || die "kernex-server exited with $code on SIGTERM"
echo "podman stop: exit code 0 after $(secs "$stop_ms")"

# The volume, not the container's layer, holds the data: a new container on it sees the tenant.
listing=$("${podman[@]}" run --rm "${run_opts[@]}" -v "$volume:/var/lib/kernex" "$image" tenant list) \
  || die "kernex-server tenant list in a new container on $volume failed"
grep -q '^acme' <<<"$listing" || die "a new container on $volume does not see tenant acme: $listing"
files=$("${podman[@]}" run --rm "${run_opts[@]}" -v "$volume:/data:ro" "$base_image" \
  stat -c '%u:%g %a %n' /data /data/kernex.db)
grep -q '^65532:65532 700 /data$' <<<"$files" || die "the volume's root is not 65532:65532 0700: $files"
echo "volume $volume: $(paste -sd, <<<"$files" | sed 's/,/, /g'); tenant acme seen by a new container"

total_ms=$(($(now_ms) - t_start))
echo
echo "container-smoke: ok (runtime ${runtime:-default}, nofile $nofile, nproc $nproc)"
printf '  %-22s %s\n' \
  "image size" "$(awk -v b="$size" 'BEGIN { printf "%.1f MB (%d bytes)", b / 1e6, b }')" \
  "server binary" "$(stat -c %s "$bin") bytes" \
  "base image" "$([ "$base_ms" = 0 ] && echo cached || echo "built in $(secs "$base_ms")")" \
  "podman build" "$(secs "$build_ms")" \
  "run to /healthz 200" "$(secs "$healthy_ms")" \
  "run to /readyz 200" "$(secs "$ready_ms")" \
  "stop (SIGTERM)" "$(secs "$stop_ms")" \
  "total" "$(secs "$total_ms")"
