#!/usr/bin/env bash
# The README's test command (`make test`, CI=true) on a fresh Debian 12, as a new user would
# run it: a minimal bookworm root made with mmdebstrap, a clean clone of this repository's
# HEAD in it, and `make test` in a chroot, inside a mount namespace of its own (so the host's
# mount table never sees /proc, /sys, /dev or the tmpfs mounts it needs). The chroot shares
# the host's network namespace for apt and pip, as a fresh machine would; the lab tests make
# their own namespaces as always. CI's first stage (.ci/run). Needs root; installs mmdebstrap.
#
#   scripts/fresh-root-test.sh [ROOT_DIR]
#
# Without ROOT_DIR the root is made in a new directory under /tmp and removed afterwards. The
# bare Debian root (the part mmdebstrap makes, a minute of downloads) is kept as a tarball
# keyed by a hash of its recipe, in $MAILGATE_FRESH_ROOT_CACHE (default
# /var/cache/mailgate/fresh-root); everything `make test` installs is installed afresh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "fresh-root: run as root (mmdebstrap, chroot, and the lab's network namespaces)" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || "$repo/scripts/install-debs.sh" mmdebstrap

recipe=(--variant=apt --include=ca-certificates,git,make bookworm)
hash=$(printf '%s\n' "${recipe[@]}" | sha256sum | cut -c1-16)
cache_dir=${MAILGATE_FRESH_ROOT_CACHE:-/var/cache/mailgate/fresh-root}
tarball=$cache_dir/debian12-$hash.tar

if [ $# -ge 1 ]; then
  root=$1
  mkdir -p "$root"
else
  root=$(mktemp -d /tmp/mailgate-fresh-root.XXXXXX)
  trap 'rm -rf --one-file-system "$root"' EXIT
fi
started=$SECONDS
if [ ! -x "$root/usr/bin/apt-get" ]; then
  if [ ! -s "$tarball" ]; then
    echo "fresh-root: no cached Debian 12 root for this recipe ($hash): mmdebstrap (about a minute)"
    mkdir -p "$cache_dir"
    mmdebstrap --quiet --format=tar "${recipe[@]}" "$tarball.part"
    mv "$tarball.part" "$tarball"
  fi
  echo "fresh-root: unpacking $tarball into $root"
  tar -C "$root" -xf "$tarball"
fi
rm -rf "$root/root/mailgate"
git clone -q "$repo" "$root/root/mailgate"
# This machine's CA bundle: on a network whose TLS is re-signed on the way (a proxy), PyPI is
# reachable only with it; elsewhere it is the same public bundle.
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
echo "fresh-root: make test in $root/root/mailgate (HEAD $(git -C "$repo" rev-parse --short HEAD))"
status=0
unshare -m --propagation private bash -c '
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
' fresh-root "$root" || status=$?
echo "fresh-root: make test exited $status after $((SECONDS - started)) s"
exit "$status"
