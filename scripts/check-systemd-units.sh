#!/usr/bin/env bash
# Checks the shipped systemd units with `systemd-analyze verify`. The binaries they start are not
# installed on a build machine, so each unit is verified from a copy whose ExecStart points at
# /bin/true: every other directive (sandboxing, credentials, directories) is still checked.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
    echo "check-systemd-units: skipped, systemd-analyze is not installed (Debian package systemd)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in deploy/systemd/kernex-server.service deploy/systemd/kernex-server-backup.service deploy/systemd/kernex-server-backup.timer overlays/etc/systemd/system/kernex-agent.service; do
    name=$(basename "$unit")
    sed -E 's#^ExecStart=/usr/local/bin/[^ ]+#ExecStart=/bin/true#' "$unit" >"$tmp/$name"
    if ! out=$(systemd-analyze verify "$tmp/$name" 2>&1) || [ -n "$out" ]; then
        echo "check-systemd-units: $unit fails systemd-analyze verify:" >&2
        echo "$out" >&2
        exit 1
    fi
    echo "check-systemd-units: $unit ok"
done
