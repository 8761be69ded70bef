#!/bin/bash
# build-standin.sh OUT.iso
#
# Builds, from Debian packages only, a small "stand-in" for the Ubuntu 24.04
# live-server ISO: same ISO layout (volume id, /casper, /boot/grub with
# Ubuntu's exact grub.cfg, /EFI/boot, /.disk/info, md5sum.txt, boot.catalog,
# MBR/GPT hybrid with an appended EFI system partition, El Torito entries for
# BIOS and UEFI), but the kernel is Debian's and the initrd is a busybox
# initramfs whose /init emulates what subiquity does with a NoCloud
# autoinstall seed (late-commands, curtin in-target, systemctl enable) and
# then the installed system's first boot (see initramfs/init).
#
# Files used next to this script: initramfs/{init,autoinstall.awk,unit.awk,
# curtin,systemctl,udhcpc.script}.
#
# Runs unattended as root on Debian 12 (bookworm), a minute or two.  Host
# tools are apt-get installed when missing; the kernel, busybox-static and
# memtest86+ packages are fetched with `apt-get download` into a cache
# (STANDIN_CACHE, default /var/cache/kernex-standin) and unpacked, never
# installed on the host.  Output is reproducible for a given set of package
# versions (SOURCE_DATE_EPOCH is fixed unless set by the caller).
#
# Environment knobs:
#   STANDIN_CACHE        package cache directory
#   STANDIN_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
#   SOURCE_DATE_EPOCH    timestamp for every file/volume date (default 2024-08-27)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/initramfs
VOLID='Ubuntu-Server 24.04.1 LTS amd64'
CACHE=${STANDIN_CACHE:-/var/cache/kernex-standin}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1724716800}
export LC_ALL=C TZ=UTC

# Top-level kernel modules for the initramfs (dependencies are added
# automatically).  Order matters only for soft dependencies that busybox
# modprobe does not know: crct10dif before sd_mod, ehci before uhci/ohci.
MODULES="
crct10dif_generic
ata_piix ata_generic ahci
sr_mod sd_mod
virtio_pci virtio_blk virtio_scsi
ehci_pci uhci_hcd ohci_pci xhci_pci usb_storage uas
isofs
e1000 e1000e virtio_net
"

# GRUB modules built into the BIOS (El Torito) and UEFI images.  All other
# modules are also shipped in /boot/grub/<platform>/ on the ISO, as Ubuntu
# does, so GRUB can load more on demand.
GRUB_COMMON="iso9660 part_msdos part_gpt normal configfile linux search search_fs_file
search_fs_uuid search_label test echo ls cat font gfxterm all_video video_bochs
video_cirrus halt reboot chain boot minicmd loadenv regexp sleep true gzio"
GRUB_BIOS_MODULES="biosdisk linux16 vbe vga $GRUB_COMMON"
GRUB_EFI_MODULES="fat efi_gop efi_uga efifwsetup $GRUB_COMMON"

msg() { printf '[build-standin] %s\n' "$*" >&2; }
die() { msg "ERROR: $*"; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT.iso"
[ "$(id -u)" -eq 0 ] || die "must run as root (mknod, apt-get)"
OUT=$(realpath -m "$1")
for f in init autoinstall.awk unit.awk curtin systemctl udhcpc.script; do
	[ -f "$SRC/$f" ] || die "missing $SRC/$f"
done

# --- host tools ------------------------------------------------------------
need_pkgs=""
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs="$need_pkgs $2"; }
need xorriso xorriso
need grub-mkimage grub-common
need mkfs.fat dosfstools
need mcopy mtools
need cpio cpio
need depmod kmod
need zstd zstd
[ -f /usr/lib/grub/i386-pc/boot_hybrid.img ] || need_pkgs="$need_pkgs grub-pc-bin"
[ -d /usr/lib/grub/x86_64-efi ] || need_pkgs="$need_pkgs grub-efi-amd64-bin"
if [ -n "$need_pkgs" ]; then
	msg "installing host tools:$need_pkgs"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_pkgs >/dev/null
fi

WORK=$(mktemp -d /tmp/standin-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# --- payload packages (downloaded, unpacked, never installed) ----------------
mkdir -p "$CACHE"
KPKG=${STANDIN_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
	KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	if [ -z "$KPKG" ]; then
		apt-get update -qq
		KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	fi
fi
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64"

# fetch PKG: print the path of the cached .deb of the candidate version
fetch() {
	local pkg=$1 ver dir
	ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
	[ -n "$ver" ] && [ "$ver" != "(none)" ] || return 1
	dir=$CACHE/$pkg/${ver//:/%3a}
	if ! ls "$dir"/*.deb >/dev/null 2>&1; then
		mkdir -p "$dir"
		(cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver") >&2 || return 1
	fi
	ls "$dir"/*.deb | head -n 1
}
msg "kernel package: $KPKG"
KDEB=$(fetch "$KPKG") || die "cannot download $KPKG"
BBDEB=$(fetch busybox-static) || die "cannot download busybox-static"
MTDEB=$(fetch memtest86+ || true)

mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/memtest"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BBDEB" "$WORK/busybox"
[ -n "$MTDEB" ] && dpkg-deb -x "$MTDEB" "$WORK/memtest"
KVER=$(basename "$(ls -d "$WORK"/kernel/lib/modules/*)")
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
BUSYBOX=$WORK/busybox/bin/busybox
[ -f "$VMLINUZ" ] || die "no vmlinuz in $KDEB"
[ -x "$BUSYBOX" ] || die "no busybox in $BBDEB"
msg "kernel $KVER, $("$BUSYBOX" | head -n 1)"

# --- initramfs ----------------------------------------------------------------
IR=$WORK/initramfs
mkdir -p "$IR"/{bin,sbin,usr/bin,usr/sbin,etc/standin,proc,sys,dev,run,tmp,cdrom,target,root,usr/share/standin,usr/share/udhcpc}
install -m 0755 "$BUSYBOX" "$IR/bin/busybox"
for a in $("$BUSYBOX" --list-full); do
	case $a in
	bin/busybox) continue ;;
	bin/*) ln -sf busybox "$IR/$a" ;;
	sbin/*) ln -sf ../bin/busybox "$IR/$a" ;;
	usr/*) ln -sf ../../bin/busybox "$IR/$a" ;;
	esac
done
install -m 0755 "$SRC/init" "$IR/init"
install -m 0755 "$SRC/curtin" "$IR/usr/bin/curtin"
install -m 0755 "$SRC/systemctl" "$IR/usr/bin/systemctl"
install -m 0755 "$SRC/systemctl" "$IR/usr/share/standin/systemctl"
install -m 0755 "$SRC/udhcpc.script" "$IR/usr/share/standin/udhcpc.script"
install -m 0644 "$SRC/autoinstall.awk" "$SRC/unit.awk" "$IR/usr/share/standin/"
echo "marks the stand-in installer environment (not the target)" >"$IR/usr/share/standin/installer-env"
mknod -m 0600 "$IR/dev/console" c 5 1
mknod -m 0666 "$IR/dev/null" c 1 3
chmod 1777 "$IR/tmp"

# kernel modules: closure of $MODULES (kmod resolves dependencies and soft
# dependencies against the full module tree), then a fresh modules.dep for
# busybox modprobe.
depmod -b "$WORK/kernel" "$KVER"
KMOD=$WORK/kernel/lib/modules/$KVER
: >"$IR/etc/standin/modules"
for m in $MODULES; do
	deps=$(modprobe -d "$WORK/kernel" -S "$KVER" --show-depends "$m") || die "module $m not found in $KVER"
	echo "$deps" | awk '$1 == "insmod" {print $2}' | while read -r ko; do
		rel=${ko#"$KMOD"/}
		mkdir -p "$IR/lib/modules/$KVER/$(dirname "$rel")"
		[ -e "$IR/lib/modules/$KVER/$rel" ] || cp "$ko" "$IR/lib/modules/$KVER/$rel"
	done
	echo "$m" >>"$IR/etc/standin/modules"
done
cp "$KMOD"/modules.order "$KMOD"/modules.builtin "$KMOD"/modules.builtin.modinfo "$IR/lib/modules/$KVER/"
depmod -b "$IR" "$KVER"
msg "initramfs modules: $(find "$IR/lib/modules" -name '*.ko' | wc -l) files, $(du -sh "$IR/lib/modules" | cut -f1)"

find "$IR" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$IR" && find . | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) | zstd -q -19 >"$WORK/initrd"

# --- ISO tree --------------------------------------------------------------------
T=$WORK/iso
mkdir -p "$T"/{casper,.disk,boot/grub/fonts,boot/grub/i386-pc,boot/grub/x86_64-efi,EFI/boot}
cp "$VMLINUZ" "$T/casper/vmlinuz"
cp "$WORK/initrd" "$T/casper/initrd"
# the HWE entries boot the same kernel (hardlinks: stored once in the ISO)
ln "$T/casper/vmlinuz" "$T/casper/hwe-vmlinuz"
ln "$T/casper/initrd" "$T/casper/hwe-initrd"

cat >"$T/.disk/info" <<EOF
Ubuntu-Server 24.04.1 LTS "Noble Numbat" - Release amd64 (20240827) [Kernex stand-in, Debian kernel $KVER]
EOF

# Ubuntu 24.04 live-server grub.cfg, verbatim (tabs included)
cat >"$T/boot/grub/grub.cfg" <<'EOF'
set timeout=30

loadfont unicode

set menu_color_normal=white/black
set menu_color_highlight=black/light-gray

menuentry "Try or Install Ubuntu Server" {
	set gfxpayload=keep
	linux	/casper/vmlinuz  ---
	initrd	/casper/initrd
}
menuentry "Ubuntu Server with the HWE kernel" {
	set gfxpayload=keep
	linux	/casper/hwe-vmlinuz  ---
	initrd	/casper/hwe-initrd
}
grub_platform
if [ "$grub_platform" = "efi" ]; then
menuentry 'Boot from next volume' {
	exit 1
}
menuentry 'UEFI Firmware Settings' {
	fwsetup
}
else
menuentry 'Test memory' {
	linux16 /boot/memtest86+x64.bin
}
fi
EOF
cp "$T/boot/grub/grub.cfg" "$T/boot/grub/loopback.cfg"
cp /usr/share/grub/unicode.pf2 "$T/boot/grub/fonts/unicode.pf2"
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$T/boot/grub/i386-pc/"
cp /usr/lib/grub/x86_64-efi/*.mod /usr/lib/grub/x86_64-efi/*.lst "$T/boot/grub/x86_64-efi/"
MT=$(ls "$WORK"/memtest/boot/memtest86+x64.bin 2>/dev/null || true)
if [ -n "$MT" ]; then cp "$MT" "$T/boot/memtest86+x64.bin"; else msg "memtest86+x64.bin not available, skipped"; fi

# BIOS: El Torito no-emulation image (also started from the MBR by
# boot_hybrid.img when the ISO is written to a USB stick).  Root is the boot
# device, prefix /boot/grub -> /boot/grub/grub.cfg.
grub-mkimage -O i386-pc-eltorito -p /boot/grub -o "$T/boot/grub/i386-pc/eltorito.img" $GRUB_BIOS_MODULES

# UEFI: like Ubuntu's signed GRUB, find the ISO 9660 volume by /.disk/info,
# then normal mode reads $prefix/grub.cfg.
cat >"$WORK/efi-early.cfg" <<'EOF'
if ! search --no-floppy --file --set=root /.disk/info; then
	search --no-floppy --file --set=root /.disk/mini-info
fi
set prefix=($root)/boot/grub
EOF
grub-mkimage -O x86_64-efi -p /boot/grub -c "$WORK/efi-early.cfg" -o "$T/EFI/boot/bootx64.efi" $GRUB_EFI_MODULES
cp "$T/EFI/boot/bootx64.efi" "$T/EFI/boot/grubx64.efi"

# EFI system partition image, appended to the ISO as GPT partition 2
efi_kb=$(( ( $(stat -c %s "$T/EFI/boot/bootx64.efi") * 2 / 1024 + 1024 + 1023 ) / 1024 * 1024 ))
mkfs.fat -C --invariant -i 4b45524e -n ESP "$WORK/efi.img" "$efi_kb" >/dev/null
mmd -i "$WORK/efi.img" ::/EFI ::/EFI/boot
mcopy -m -i "$WORK/efi.img" "$T/EFI/boot/bootx64.efi" "$T/EFI/boot/grubx64.efi" ::/EFI/boot/

# md5sum.txt, Ubuntu's format.  eltorito.img is left out: -boot-info-table
# and --grub2-boot-info patch it while writing the ISO.
find "$T" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$T" && find . -type f ! -name md5sum.txt ! -path ./boot/grub/i386-pc/eltorito.img | sort | xargs md5sum) >"$T/md5sum.txt"
touch -d "@$SOURCE_DATE_EPOCH" "$T/md5sum.txt"

# --- ISO ---------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
xorriso -as mkisofs -r -J -joliet-long -l -iso-level 3 --hardlinks \
	-V "$VOLID" \
	-o "$OUT" \
	--grub2-mbr /usr/lib/grub/i386-pc/boot_hybrid.img \
	--protective-msdos-label \
	-partition_offset 16 \
	--mbr-force-bootable \
	-append_partition 2 28732ac11ff8d211ba4b00a0c93ec93b "$WORK/efi.img" \
	-appended_part_as_gpt \
	-iso_mbr_part_type a2a0d0ebe5b9334487c068b6b72699c7 \
	-c /boot.catalog \
	-b /boot/grub/i386-pc/eltorito.img \
	-no-emul-boot -boot-load-size 4 -boot-info-table --grub2-boot-info \
	-eltorito-alt-boot \
	-e --interval:appended_partition_2:all:: \
	-no-emul-boot \
	"$T" 2>"$WORK/xorriso.log" || { cat "$WORK/xorriso.log" >&2; die "xorriso failed"; }

# --- self-check ------------------------------------------------------------------------
report=$(xorriso -indev "$OUT" -report_el_torito as_mkisofs 2>/dev/null)
grep -q -- "-b '/boot/grub/i386-pc/eltorito.img'" <<<"$report" || die "no BIOS El Torito entry"
grep -q -- "-e '--interval:appended_partition_2" <<<"$report" || die "no UEFI El Torito entry"
grep -q -- "-append_partition 2 28732ac11ff8d211ba4b00a0c93ec93b" <<<"$report" || die "no appended EFI partition"
mkdir "$WORK/check"
xorriso -osirrox on -indev "$OUT" -extract / "$WORK/check" 2>/dev/null
(cd "$WORK/check" && md5sum --quiet -c md5sum.txt) || die "md5sum.txt does not match the ISO contents"
msg "wrote $OUT ($(du -k "$OUT" | cut -f1) KiB, md5sum.txt verified, El Torito BIOS+UEFI present)"
