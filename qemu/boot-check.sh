#!/bin/bash
# boot-check.sh [STANDIN.iso]
#
# Proves that the stand-in ISO (build-standin.sh) boots under QEMU/TCG and
# that its init does what Ubuntu's installer does with a NoCloud autoinstall
# seed.  Like the Kernex image builder, it never unpacks the ISO: it adds a
# seed and a modified grub.cfg with
#   xorriso -indev standin.iso -outdev test.iso -map seed /nocloud \
#           -map grub.cfg.modified /boot/grub/grub.cfg -boot_image any replay
# and boots test.iso in several ways, polling the serial log (at most
# BOOTCHECK_TIMEOUT s each, default 240):
#   bios      -cdrom, SeaBIOS (El Torito BIOS entry)
#   uefi      -cdrom, OVMF (El Torito UEFI entry -> appended ESP)
#   hdd       raw IDE hard disk, SeaBIOS (hybrid MBR, like a USB stick)
#   usb       raw USB mass-storage stick, SeaBIOS
#   uefi-hdd  raw IDE hard disk, OVMF (GPT + appended ESP)
#   fail      -cdrom, BIOS, seed whose late-command fails: expects the
#             error-commands path and power-off; also checks that enabling a
#             unit without [Install] only warns, as systemd does
#   plain     the UNMODIFIED standin.iso, BIOS: expects "no autoinstall on the
#             kernel command line" and power-off
# Without an argument, build-standin.sh builds $BOOTCHECK_DIR/standin.iso first.
# BOOTCHECK_MODES selects modes (default: all, in the order above).
# Logs: $BOOTCHECK_DIR/boot-<mode>.log (default dir: ./out next to this script).
# Exit status 0 only if every mode passes.
#
# NOTE: /dev/kvm may exist but hang on this kind of host: QEMU always runs
# with -accel tcg.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${BOOTCHECK_DIR:-$HERE/out}
TIMEOUT=${BOOTCHECK_TIMEOUT:-240}
MODES=${BOOTCHECK_MODES:-bios uefi hdd usb uefi-hdd fail plain}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

msg() { printf '[boot-check] %s\n' "$*" >&2; }
die() { msg "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
pkgs=""
command -v qemu-system-x86_64 >/dev/null || pkgs="$pkgs qemu-system-x86"
command -v xorriso >/dev/null || pkgs="$pkgs xorriso"
[ -f /usr/share/ovmf/OVMF.fd ] || pkgs="$pkgs ovmf"
if [ -n "$pkgs" ]; then
	msg "installing:$pkgs"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
# Debian 12's ovmf package: /usr/share/ovmf/OVMF.fd is the combined
# code+vars image usable with -bios.
OVMF=/usr/share/ovmf/OVMF.fd
[ -f "$OVMF" ] || OVMF=/usr/share/qemu/OVMF.fd
[ -f "$OVMF" ] || die "no OVMF.fd found"

if [ $# -ge 1 ]; then
	STANDIN=$(realpath "$1")
else
	STANDIN=$DIR/standin.iso
	msg "building $STANDIN"
	"$HERE/build-standin.sh" "$STANDIN"
fi
[ -f "$STANDIN" ] || die "no such ISO: $STANDIN"

WORK=$(mktemp -d /tmp/standin-check.XXXXXX)
QPID=""
cleanup() {
	[ -n "$QPID" ] && kill "$QPID" 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

# --- seeds -------------------------------------------------------------------
# The test seed.  The unit gets an [Install] section: without one, a real
# systemctl enable (and the stand-in's) only warns and enables nothing.
mkdir -p "$WORK/seed" "$WORK/seed-fail"
cat >"$WORK/seed/user-data" <<'EOF'
#cloud-config
autoinstall:
  version: 1
  late-commands:
    - 'mkdir -p /target/etc/kernex'
    - "echo hello-from-late-commands > /target/etc/kernex/marker"
    - 'printf ''[Unit]\nDescription=demo\n[Service]\nExecStart=/bin/sh -c "cat /etc/kernex/marker; cat /etc/machine-id; ip addr show; echo unit-ran"\n[Install]\nWantedBy=multi-user.target\n'' > /target/etc/systemd/system/demo.service'
    - curtin in-target --target=/target -- systemctl enable demo.service
EOF
echo "instance-id: standin-test" >"$WORK/seed/meta-data"

# The failure seed: the unit from the brief's original seed (no [Install]),
# then a late-command that fails because the unit was not enabled.
cat >"$WORK/seed-fail/user-data" <<'EOF'
#cloud-config
autoinstall:
  version: 1
  late-commands:
    - 'printf ''[Unit]\nDescription=demo\n[Service]\nExecStart=/bin/true\n'' > /target/etc/systemd/system/demo.service'
    - curtin in-target --target=/target -- systemctl enable demo.service
    - test -L /target/etc/systemd/system/multi-user.target.wants/demo.service
    - echo must-not-run
  error-commands:
    - echo error-commands-ran
EOF
echo "instance-id: standin-fail" >"$WORK/seed-fail/meta-data"

# --- grub.cfg: timeout 1, autoinstall on the default entry -------------------
xorriso -osirrox on -indev "$STANDIN" -extract /boot/grub/grub.cfg "$WORK/grub.cfg.orig" 2>/dev/null
chmod u+w "$WORK/grub.cfg.orig"
sed -e 's/^set timeout=30$/set timeout=1/' \
	-e '0,/^\tlinux\t\/casper\/vmlinuz  ---$/s//\tlinux\t\/casper\/vmlinuz autoinstall ds=nocloud\\;s=\/cdrom\/nocloud\/ ---/' \
	"$WORK/grub.cfg.orig" >"$WORK/grub.cfg.modified"
grep -qx 'set timeout=1' "$WORK/grub.cfg.modified" || die "grub.cfg: timeout not replaced"
grep -qxF "$(printf '\tlinux\t/casper/vmlinuz autoinstall ds=nocloud\\;s=/cdrom/nocloud/ ---')" "$WORK/grub.cfg.modified" ||
	die "grub.cfg: linux line not replaced"
msg "grub.cfg changes:"
diff "$WORK/grub.cfg.orig" "$WORK/grub.cfg.modified" >&2 || true

mkiso() { # mkiso SEEDDIR OUT.iso
	rm -f "$2"
	xorriso -indev "$STANDIN" -outdev "$2" \
		-map "$1" /nocloud \
		-map "$WORK/grub.cfg.modified" /boot/grub/grub.cfg \
		-boot_image any replay 2>"$WORK/xorriso.log" || { cat "$WORK/xorriso.log" >&2; die "xorriso failed for $2"; }
}
mkiso "$WORK/seed" "$DIR/test.iso"
mkiso "$WORK/seed-fail" "$DIR/test-fail.iso"
msg "test ISO: $DIR/test.iso ($(du -k "$DIR/test.iso" | cut -f1) KiB)"
xorriso -indev "$DIR/test.iso" -report_el_torito as_mkisofs 2>/dev/null | grep -E -- '^-(b|e|append_partition) ' >&2

# --- boot runs -------------------------------------------------------------------
# run MODE: boots, polls the log, prints PASS/FAIL with the time taken
declare -A RESULT
run() {
	local mode=$1 log=$DIR/boot-$1.log iso=$DIR/test.iso want=success
	local -a q=(qemu-system-x86_64 -accel tcg -m 1024 -nic user,model=e1000 -display none
		-serial "file:$log" -no-reboot)
	case $mode in
	bios) q+=(-cdrom "$iso") ;;
	uefi) q+=(-bios "$OVMF" -cdrom "$iso") ;;
	hdd) q+=(-drive "file=$iso,format=raw,if=ide,snapshot=on") ;;
	usb) q+=(-usb -drive "if=none,id=stick,file=$iso,format=raw,snapshot=on"
		-device "usb-storage,drive=stick,bootindex=0") ;;
	uefi-hdd) q+=(-bios "$OVMF" -drive "file=$iso,format=raw,if=ide,snapshot=on") ;;
	fail) q+=(-cdrom "$DIR/test-fail.iso"); want=failure ;;
	plain) q+=(-cdrom "$STANDIN"); want=interactive ;;
	*) die "unknown mode $mode" ;;
	esac
	rm -f "$log"
	: >"$log"
	local t0=$SECONDS verdict="" why=""
	"${q[@]}" </dev/null >"$DIR/qemu-$mode.out" 2>&1 &
	QPID=$!
	while :; do
		local el=$((SECONDS - t0)) alive=1
		kill -0 "$QPID" 2>/dev/null || alive=0
		case $want in
		success)
			if grep -q 'unit demo.service: unit-ran' "$log" &&
				grep -q 'unit demo.service: hello-from-late-commands' "$log" &&
				grep -Eq 'unit demo.service: [0-9a-f]{32}' "$log" &&
				grep -q 'unit demo.service: .*inet 10\.0\.2\.15/' "$log" &&
				grep -q 'standin: install finished' "$log"; then
				verdict=PASS; break
			fi
			if grep -Eq 'standin: (late-command failed|stopping)|Kernel panic' "$log"; then
				verdict=FAIL; why="installer stopped"; break
			fi ;;
		failure)
			if [ $alive = 0 ]; then
				if grep -q 'The unit files have no installation config' "$log" &&
					grep -q 'standin: late-command failed' "$log" &&
					grep -q 'standin: error-commands' "$log" &&
					grep -q 'standin:   | error-commands-ran' "$log" &&
					! grep -q 'must-not-run' "$log" &&
					! grep -q 'install finished' "$log"; then
					verdict=PASS
				else
					verdict=FAIL; why="unexpected log"
				fi
				break
			fi ;;
		interactive)
			if [ $alive = 0 ]; then
				if grep -q 'standin: no autoinstall on the kernel command line; would start the interactive installer' "$log"; then
					verdict=PASS
				else
					verdict=FAIL; why="message not seen"
				fi
				break
			fi ;;
		esac
		if [ $alive = 0 ]; then verdict=FAIL; why="QEMU exited"; break; fi
		if [ $el -ge "$TIMEOUT" ]; then verdict=FAIL; why="timeout"; break; fi
		sleep 1
	done
	local took=$((SECONDS - t0))
	kill "$QPID" 2>/dev/null || true
	wait "$QPID" 2>/dev/null || true
	QPID=""
	RESULT[$mode]="$verdict ${took}s${why:+ ($why)}"
	printf '%-9s %s\n' "$mode" "${RESULT[$mode]}"
	if [ "$verdict" != PASS ]; then
		msg "last lines of $log:"
		tail -n 25 "$log" | tr -d '\r' >&2
	fi
}

msg "booting (TCG, timeout ${TIMEOUT}s per mode): $MODES"
for m in $MODES; do run "$m"; done

echo "---- summary ($STANDIN, $(du -k "$STANDIN" | cut -f1) KiB)"
rc=0
for m in $MODES; do
	printf '%-9s %s\n' "$m" "${RESULT[$m]}"
	case ${RESULT[$m]} in PASS*) ;; *) rc=1 ;; esac
done
exit $rc
