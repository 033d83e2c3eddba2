#!/usr/bin/env bash
# Build (once) a private Debian 13 root holding QEMU 10.0 (Debian's own qemu-system-x86), for the
# tests that migrate to and from a current QEMU. Usage: .ci/qemu10-root.sh ROOT
# Prints the path of a wrapper that runs that QEMU from the host (through the root's loader).
set -euo pipefail
root=${1:?usage: qemu10-root.sh ROOT}
wrapper="$root/run-qemu-system-x86_64"
if [ -x "$wrapper" ] && "$wrapper" --version 2>/dev/null | grep -q 'QEMU emulator version 10\.'; then
    echo "$wrapper"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
command -v debootstrap >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends debootstrap >&2
# the mirror this machine's apt already uses
mirror=$(grep -hoE '^URIs: *http[^ ]*debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
[ -n "$mirror" ] || mirror=$(grep -hoE '^deb +http[^ ]*/debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 | awk '{print $2}')
[ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt" >&2; exit 1; }
rm -rf "$root.tmp"
mkdir -p "$(dirname "$root")"
debootstrap --variant=minbase trixie "$root.tmp" "$mirror" >&2
mount --bind /proc "$root.tmp/proc"
mount --bind /dev "$root.tmp/dev"
trap 'umount "$root.tmp/dev" 2>/dev/null || true; umount "$root.tmp/proc" 2>/dev/null || true' EXIT
chroot "$root.tmp" apt-get update -q >&2
chroot "$root.tmp" apt-get install -y -q --no-install-recommends qemu-system-x86 >&2
umount "$root.tmp/dev"
umount "$root.tmp/proc"
trap - EXIT
rm -rf "$root"
mv "$root.tmp" "$root"
cat > "$wrapper" <<WRAP
#!/bin/sh
# QEMU 10 of the private root $root, run from the host with host paths unchanged.
r=$root
exec "\$r/lib64/ld-linux-x86-64.so.2" --library-path "\$r/lib/x86_64-linux-gnu:\$r/usr/lib/x86_64-linux-gnu" "\$r/usr/bin/qemu-system-x86_64" -L "\$r/usr/share/qemu" -L "\$r/usr/share/seabios" "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
