#!/usr/bin/env bash
# Builds the QEMU stand-in for a KVM user VM from the stand-in base ISO: its kernel, its initrd with
# busybox and the NIC modules, a different /init (qemu/uservm/init) and the static kernex-agent.
#   qemu/build-uservm.sh STANDIN_ISO AGENT_BIN OUT_DIR   → OUT_DIR/vmlinuz, OUT_DIR/initrd
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 STANDIN_ISO AGENT_BIN OUT_DIR" >&2; exit 2; }
iso=$1 agent=$2 out=$3
src=$(cd "$(dirname "$0")" && pwd)/uservm
[ -f "$iso" ] || { echo "build-uservm: $iso not found (just standin)" >&2; exit 1; }
[ -x "$agent" ] || { echo "build-uservm: $agent not found or not executable (just agent-binary)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$work/root"
xorriso -osirrox on -indev "$iso" -extract /casper/vmlinuz "$work/vmlinuz" -extract /casper/initrd "$work/initrd" 2>/dev/null
chmod u+w "$work/vmlinuz" "$work/initrd"
(cd "$work/root" && zstd -dc "$work/initrd" | cpio --quiet -id)
rm -rf "$work/root/usr/share/standin" "$work/root/usr/bin/curtin" "$work/root/usr/bin/systemctl"
install -m 0755 "$src/init" "$work/root/init"
install -m 0755 "$agent" "$work/root/usr/bin/kernex-agent"
(cd "$work/root" && find . | sort | cpio --quiet -o -H newc -R 0:0) | zstd -q -3 >"$out/initrd"
cp "$work/vmlinuz" "$out/vmlinuz"
echo "build-uservm: $out/vmlinuz, $out/initrd ($(stat -c %s "$out/initrd") bytes)"
