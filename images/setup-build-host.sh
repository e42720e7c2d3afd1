#!/usr/bin/env bash
# Installs what `make image` and `make image-test` need on the Debian 12 build machine, as root,
# on top of what scripts/setup-host.sh installs. Safe to run again: installs only what is missing.
#   mmdebstrap          the root filesystem, without mounting anything but its chroot
#   e2fsprogs fdisk     the disk: sfdisk for the partition table, mke2fs -d to fill ext4 unmounted
#   dosfstools mtools   the small FAT config partition, filled without mounting (no vfat here)
#   grub-pc-bin         BIOS GRUB (boot.img + core.img put in place with dd)
#   zstd                the compressed image
#   qemu-system-x86     the boot test (TCG: this host's KVM is unusable)
set -euo pipefail

packages=(mmdebstrap e2fsprogs fdisk dosfstools mtools grub-pc-bin zstd qemu-system-x86
          python3-venv)

if [ "$(id -u)" != 0 ]; then
  echo "setup-build-host: run as root (mmdebstrap --mode=root, namespaces and taps for the test)" >&2
  exit 1
fi

"$(dirname "$0")/../scripts/install-debs.sh" "${packages[@]}"
