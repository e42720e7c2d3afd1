#!/usr/bin/env bash
# The README's test command (`make test`, CI=true) on a fresh Debian 12, as a new user would
# run it: a minimal bookworm root made with mmdebstrap, a clean clone of this repository's
# HEAD in it, and `make test` in a chroot, inside a mount namespace of its own (so the host's
# mount table never sees /proc, /sys, /dev or the tmpfs mounts it needs). The chroot shares
# the host's network namespace for apt and pip, as a fresh machine would; the lab tests make
# their own namespaces as always. Needs root and mmdebstrap (images/setup-build-host.sh).
#
#   scripts/fresh-root-test.sh [ROOT_DIR]     (default: a new directory under /tmp)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-$(mktemp -d /tmp/mailgate-fresh-root.XXXXXX)}
if [ ! -x "$root/usr/bin/apt-get" ]; then
  echo "fresh-root: making a Debian 12 root in $root"
  mmdebstrap --variant=apt --include=ca-certificates,git,make bookworm "$root"
fi
rm -rf "$root/root/mailgate"
git clone -q "$repo" "$root/root/mailgate"
# This machine's CA bundle: on a network whose TLS is re-signed on the way (a proxy), PyPI is
# reachable only with it; elsewhere it is the same public bundle.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
echo "fresh-root: make test in $root/root/mailgate (HEAD $(git -C "$repo" rev-parse --short HEAD))"
exec unshare -m --propagation private bash -c '
  set -e
  R=$1
  mount --bind "$R" "$R"
  mount -t proc proc "$R/proc"
  mount --rbind /sys "$R/sys"
  mount --rbind /dev "$R/dev"
  mount -t tmpfs tmpfs "$R/run"
  mount -t tmpfs tmpfs "$R/tmp"
  exec chroot "$R" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 CI=true bash -c "cd /root/mailgate && make test"
' fresh-root "$root"
