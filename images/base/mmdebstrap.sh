#!/usr/bin/env bash
# The base root filesystem of the appliance: Debian 12 with the packages of packages.txt, its
# initramfs built, nothing of mailgate's own yet (build.sh adds that on top of a copy, so that a
# change to mailgate or its units never costs a base rebuild).
#   usage: mmdebstrap.sh ROOTDIR
# Needs root (mmdebstrap --mode=root). Reaches only the Debian mirror ($MAILGATE_DEBIAN_MIRROR,
# default deb.debian.org).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$1
mirror=${MAILGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${MAILGATE_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

packages=$(sed -e 's/#.*//' "$here/packages.txt" | xargs | tr ' ' ',')

# No docs, man pages or translations (copyright files stay: the licenses travel with the image).
dpkg_opts=(
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
)

# Before any package is unpacked: the initramfs is built with a short module list (a 6 MB
# initrd, about 40 s less than MODULES=most), zstd-compressed.
setup_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/mailgate.conf"'

# After installing: the base facts every build shares.
customize_hook='set -e
echo mailgate > "$1/etc/hostname"
printf "127.0.0.1\tlocalhost\n127.0.1.1\tmailgate\n::1\tlocalhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"
chroot "$1" passwd --lock root >/dev/null'

exec mmdebstrap --variant=minbase --mode=root --format=directory \
  --aptopt='APT::Install-Recommends "false"' \
  --include="$packages" \
  "${dpkg_opts[@]}" \
  --setup-hook="$setup_hook" \
  --setup-hook="copy-in $here/initramfs-modules /usr/share/initramfs-tools/modules.d/" \
  --customize-hook="$customize_hook" \
  bookworm "$root" \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main"
