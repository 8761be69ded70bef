#!/usr/bin/env bash
# Cost of a tenant ISO, measured side by side in one run on a base the size of Ubuntu's:
# the stand-in ISO grown with a filler "squashfs" layer (BENCH_ISO_FILLER_MIB, default 2600 MiB), then
#   cp of the base                       (the floor: one copy)
#   imagebuilder build --no-cache        (full xorriso remaster)
#   imagebuilder build, cold cache       (prepares the base once, then copies)
#   imagebuilder build, warm cache       (one copy + a few KiB overwritten), 3 runs
# Writes bench/results/iso-<UTC time>.md. Usage: bench-iso.sh STANDIN.iso AGENT
set -euo pipefail
standin=$1 agent=$2
root=$(pwd)
ib="$root/target/release/imagebuilder"
work=$(mktemp -d -t kernex-bench-iso.XXXXXX)
trap 'rm -rf "$work"' EXIT
filler_mib=${BENCH_ISO_FILLER_MIB:-2600}

echo "==> growing the stand-in to an Ubuntu-sized base (${filler_mib} MiB filler)" >&2
head -c $((filler_mib * 1024 * 1024)) /dev/urandom > "$work/filler.squashfs"
xorriso -indev "$standin" -outdev "$work/base.iso" -map "$work/filler.squashfs" /casper/ubuntu-server.squashfs \
  -boot_image any replay 2>/dev/null
rm "$work/filler.squashfs"
size=$(stat -c %s "$work/base.iso")

mkdir -p "$work/tenants" "$work/out"
printf 'server_url = "https://cp.example.net:8443"\ntoken_file = "acme.token"\n' > "$work/tenants/acme.toml"
echo "kxb_0123456789abcdef_$(printf '%064d' 7)" > "$work/tenants/acme.token"

seconds() { local s; s=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $s" | bc; }
build() { "$ib" build --tenant acme --base "$work/base.iso" --tenants-dir "$work/tenants" --out "$work/out" \
  --agent "$agent" --overlays "$root/overlays" --force --cache-dir "$work/cache" "$@"; }

cat "$work/base.iso" > /dev/null   # same warm page cache for every contender
t_cp=$(seconds cp "$work/base.iso" "$work/copy.iso"); rm "$work/copy.iso"
t_full=$(seconds build --no-cache)
t_cold=$(seconds build)
warm=()
for _ in 1 2 3; do warm+=("$(seconds build)"); done
t_warm=$(printf '%s\n' "${warm[@]}" | sort -n | sed -n 2p)   # median of 3
ratio() { echo "scale=2; $1 / $t_cp" | bc; }

out="bench/results/iso-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# Tenant ISO build cost, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Base: stand-in + ${filler_mib} MiB filler = $((size / 1048576)) MiB; $(nproc) cores; warm page cache."
  echo
  echo "| step | seconds | × cp |"
  echo "| --- | --- | --- |"
  echo "| cp of the base | $t_cp | 1.00 |"
  echo "| imagebuilder build --no-cache (full remaster) | $t_full | $(ratio "$t_full") |"
  echo "| imagebuilder build, cold cache (prepare + copy) | $t_cold | $(ratio "$t_cold") |"
  echo "| imagebuilder build, warm cache (median of 3) | $t_warm | $(ratio "$t_warm") |"
  echo
  echo "The warm build includes hashing the output for its .sha256 and build record."
} > "$out"
cat "$out"
echo "written to $out"
