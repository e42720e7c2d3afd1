#!/usr/bin/env bash
# Builds the mailgate appliance: a bootable Debian 12 disk image (BIOS, GRUB, serial console)
# holding mailgate from this checkout, clamd, spamd and the systemd units that tie them together.
#
#   images/build.sh            (as root; `make image` runs it after installing what it needs)
#
# Output in images/build/:
#   mailgate.raw          the disk: MBR, p1 = FAT config partition MGCONFIG, p2 = ext4 root
#   mailgate.raw.zst      the same, compressed (zstd -d --sparse restores it)
#   vmlinuz initrd.img cmdline   the kernel, initrd and command line, for direct qemu boots
#
# The Debian part is slow (about a minute) and rarely changes: it is cached as
# images/cache/base-<hash>.tar.zst, keyed by a hash of images/base/ (package list, mmdebstrap
# recipe, initramfs modules). Everything of mailgate's own (a wheel of the checkout as it is
# now, its dependencies from PyPI, images/rootfs/) goes on top of a fresh copy at every build.
#
# Environment: MAILGATE_IMAGE_DEBUG=1 (developers only: root shell on the serial console
# without a password), MAILGATE_IMAGE_SIZE (default 2G), MAILGATE_DEBIAN_MIRROR and
# MAILGATE_DEBIAN_SECURITY (see base/mmdebstrap.sh).
set -euo pipefail

IMAGES=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$IMAGES")
BUILD=$IMAGES/build
CACHE=$IMAGES/cache
ROOT=$BUILD/root
LOGS=$BUILD/logs
DISK=$BUILD/mailgate.raw
SIZE=${MAILGATE_IMAGE_SIZE:-2G}
ROOT_LABEL=mailgate-root
CONFIG_LABEL=MGCONFIG
CONFIG_MIB=32  # p1, FAT16: the config partition
# net.ifnames=0: the NICs are eth0, eth1... in probe order on any hardware, as the default
# config expects. console=ttyS0 last: the serial port is the primary console (/dev/console).
CMDLINE="root=LABEL=$ROOT_LABEL rw net.ifnames=0 console=tty0 console=ttyS0,115200"
UNITS=(mailgate-config-import.service mailgate-netsetup.service mailgate.service
       mailgate-ready.service clamav-daemon.service spamd.service)
# Off: freshclam and apt have nothing to reach from a bridge without an address (see
# images/README.md to turn freshclam on); e2scrub checks LVM snapshots, and there is no LVM.
UNITS_OFF=(clamav-freshclam.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer
           e2scrub_reap.service)

# --- progress ---------------------------------------------------------------------------------

BUILD_START=$(date +%s.%N)

since() { awk -v now="$(date +%s.%N)" -v then="$1" 'BEGIN { print now - then }'; }

say() { printf '[image %6.1fs] %s\n' "$(since "$BUILD_START")" "$*"; }

# step NAME FUNCTION: run FUNCTION with its output in logs/NAME.log; print a line when it starts
# and when it ends, with its time; on failure show the end of the log and stop.
step() {
  local name=$1 func=$2 started log
  started=$(date +%s.%N)
  log=$LOGS/$name.log
  say "$name ..."
  # A subshell with errexit of its own: in an `if` condition bash would ignore `set -e` inside
  # the function, and a failed command in the middle of a step would go unnoticed.
  set +e
  (set -e; "$func") >"$log" 2>&1
  local status=$?
  set -e
  if [ "$status" != 0 ]; then
    say "$name FAILED (status $status) after $(printf '%.1f' "$(since "$started")") s;" \
        "the end of $log:"
    tail -n 40 "$log" | sed 's/^/    /'
    exit 1
  fi
  say "$name done in $(printf '%.1f' "$(since "$started")") s"
}

# A command inside the image's root, with a clean environment (none of the build host's
# PIP_*, LANG or PATH settings leak in).
in_root() {
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 chroot "$ROOT" "$@"
}

# --- steps ------------------------------------------------------------------------------------

base_hash() {
  (cd "$IMAGES/base" && sha256sum packages.txt mmdebstrap.sh initramfs-modules) \
    | sha256sum | cut -c1-16
}

make_base() {
  local tmp=$CACHE/base-$HASH.tmp
  rm -rf "$tmp" "$TARBALL.partial"
  "$IMAGES/base/mmdebstrap.sh" "$tmp"
  tar --xattrs --xattrs-include='*' --numeric-owner -C "$tmp" -cf - . \
    | zstd -T0 -q -o "$TARBALL.partial"
  mv "$TARBALL.partial" "$TARBALL"
  rm -rf "$tmp"
  # One base is enough: drop those of older recipes.
  find "$CACHE" -maxdepth 1 -name 'base-*.tar.zst' ! -name "base-$HASH.tar.zst" -delete
}

unpack_base() {
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  zstd -dc "$TARBALL" | tar --xattrs --xattrs-include='*' --numeric-owner -C "$ROOT" -xpf -
}

build_wheels() {
  # A copy of the package sources as they are now (committed or not), so the build leaves no
  # build/ or egg-info behind in the checkout.
  rm -rf "$BUILD/src" "$BUILD/wheels"
  mkdir -p "$BUILD/src"
  (cd "$REPO" && tar --exclude=__pycache__ --exclude='*.egg-info' -cf - \
      pyproject.toml README.md interceptor proxies netsetup) | tar -C "$BUILD/src" -xf -
  # The image's Python is Debian 12's 3.11, as on this build host: cp311 wheels fit.
  "$REPO/.venv/bin/pip" wheel --disable-pip-version-check --wheel-dir "$BUILD/wheels" \
    "$BUILD/src"
  ls -l "$BUILD/wheels"
}

install_mailgate() {
  rm -rf "$ROOT/tmp/wheels" "$ROOT/opt/mailgate"
  cp -r "$BUILD/wheels" "$ROOT/tmp/wheels"
  in_root python3 -m venv /opt/mailgate
  in_root /opt/mailgate/bin/pip install --disable-pip-version-check --no-index \
    --find-links /tmp/wheels mailgate
  rm -rf "$ROOT/tmp/wheels"
  in_root /opt/mailgate/bin/mailgate --help >/dev/null
  mkdir -p "$ROOT/usr/share/doc/mailgate"
  cp "$REPO/README.md" "$ROOT/usr/share/doc/mailgate/README.md"
  cp "$IMAGES/README.md" "$ROOT/usr/share/doc/mailgate/IMAGE.md"
  {
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "source: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "base: $HASH"
  } > "$ROOT/opt/mailgate/BUILD-INFO"
  cat "$ROOT/opt/mailgate/BUILD-INFO"
}

configure_system() {
  # images/rootfs/ holds every file of the appliance's own: config, units, helper scripts.
  cp -r --no-preserve=ownership "$IMAGES/rootfs/." "$ROOT/"
  systemd-sysusers --root="$ROOT"
  in_root chown root:mailgate /etc/mailgate /etc/mailgate/mailgate.toml
  chmod 0750 "$ROOT/etc/mailgate"
  chmod 0640 "$ROOT/etc/mailgate/mailgate.toml"
  install -d -m 0750 "$ROOT/var/spool/mailgate"
  in_root chown mailgate:mailgate /var/spool/mailgate
  mkdir -p "$ROOT/boot/config"
  # The default config must load with the mailgate it ships with.
  in_root /opt/mailgate/bin/python -c \
    'from pathlib import Path; from proxies.config import load_config;
load_config(Path("/etc/mailgate/mailgate.toml")); print("default config: ok")'
  systemctl --root="$ROOT" enable "${UNITS[@]}"
  systemctl --root="$ROOT" disable "${UNITS_OFF[@]}"
  systemctl --root="$ROOT" set-default multi-user.target
  if [ "${MAILGATE_IMAGE_DEBUG:-}" = 1 ]; then
    # For developers only: a root shell without password on the serial console.
    mkdir -p "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d"
    printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %%I $TERM\n' \
      > "$ROOT/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
    in_root passwd --delete root
    echo "DEBUG IMAGE: root logs in on the serial console without a password"
  fi
}

install_bootloader_files() {
  local kernel
  kernel=$(cd "$ROOT/boot" && ls vmlinuz-* | sort -V | tail -n 1)
  KVER=${kernel#vmlinuz-}
  mkdir -p "$ROOT/boot/grub/i386-pc"
  # All of GRUB's BIOS modules next to grub.cfg: core.img holds only what finds and reads it.
  cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$ROOT/boot/grub/i386-pc/"
  cat > "$ROOT/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
menuentry "mailgate (Debian 12, $KVER)" {
  linux /boot/vmlinuz-$KVER $CMDLINE
  initrd /boot/initrd.img-$KVER
}
EOF
  cp "$ROOT/boot/vmlinuz-$KVER" "$BUILD/vmlinuz"
  cp "$ROOT/boot/initrd.img-$KVER" "$BUILD/initrd.img"
  echo "$CMDLINE" > "$BUILD/cmdline"
  echo "kernel $KVER"
}

make_disk() {
  local total_mib root_start_mib root_mib config_img core
  total_mib=$(( $(numfmt --from=iec "$SIZE") / 1048576 ))
  root_start_mib=$(( 1 + CONFIG_MIB ))
  root_mib=$(( total_mib - root_start_mib ))
  rm -f "$DISK" "$DISK.zst"
  truncate -s "${total_mib}M" "$DISK"
  # MBR: the first MiB holds GRUB's core.img; p1 FAT16 (LBA) first, so any OS shows it.
  sfdisk --quiet "$DISK" <<EOF
label: dos
start=1MiB, size=${CONFIG_MIB}MiB, type=e
start=${root_start_mib}MiB, type=83, bootable
EOF
  # Filesystems written straight into the file at their offsets: nothing is mounted.
  mke2fs -q -F -t ext4 -L "$ROOT_LABEL" -d "$ROOT" \
    -E "offset=$(( root_start_mib * 1048576 ))" "$DISK" "${root_mib}M"
  config_img=$BUILD/config.fat
  rm -f "$config_img"
  mkfs.vfat -n "$CONFIG_LABEL" -F 16 -C "$config_img" $(( CONFIG_MIB * 1024 ))
  cp "$IMAGES/rootfs/etc/mailgate/mailgate.toml" "$BUILD/mailgate.toml.example"
  sed 's/$/\r/' "$IMAGES/config-partition-README.txt" > "$BUILD/README.txt"
  mcopy -i "$config_img" "$BUILD/README.txt" "$BUILD/mailgate.toml.example" ::
  dd if="$config_img" of="$DISK" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$config_img"
  # GRUB for BIOS without grub-install: boot.img's code into the MBR (the partition table
  # after byte 440 untouched), core.img from sector 1 in the gap before p1. "(,msdos2)" is
  # partition 2 of whatever disk the BIOS booted.
  core=$BUILD/core.img
  grub-mkimage -O i386-pc -o "$core" -p '(,msdos2)/boot/grub' \
    biosdisk part_msdos ext2 normal configfile linux serial terminal echo test search
  if [ "$(stat -c %s "$core")" -gt $(( 1048576 - 512 )) ]; then
    echo "core.img does not fit before the first partition" >&2
    return 1
  fi
  dd if=/usr/lib/grub/i386-pc/boot.img of="$DISK" bs=440 count=1 conv=notrunc status=none
  dd if="$core" of="$DISK" bs=512 seek=1 conv=notrunc status=none
  rm -f "$core"
  sfdisk --list "$DISK"
}

compress() {
  zstd -T0 -q -f "$DISK" -o "$DISK.zst"
}

# --- main -------------------------------------------------------------------------------------

if [ "$(id -u)" != 0 ]; then
  echo "build.sh: run as root (mmdebstrap --mode=root, chroot, file ownership in the image)" >&2
  exit 1
fi
if [ ! -x "$REPO/.venv/bin/pip" ]; then
  echo "build.sh: no $REPO/.venv: run 'make setup' first (make image does)" >&2
  exit 1
fi
mkdir -p "$BUILD" "$CACHE" "$LOGS"
HASH=$(base_hash)
TARBALL=$CACHE/base-$HASH.tar.zst

if [ -f "$TARBALL" ]; then
  say "base root: cached $(basename "$TARBALL")"
else
  say "base root: none cached for this recipe ($HASH), building it (about a minute)"
  step base-root make_base
fi
step unpack-base unpack_base
step wheels build_wheels
step install-mailgate install_mailgate
step configure configure_system
step bootloader install_bootloader_files
step disk make_disk
step compress compress
say "built $(du -h --apparent-size "$DISK" | cut -f1) $DISK ($(du -h "$DISK" | cut -f1) used)," \
    "$(du -h "$DISK.zst" | cut -f1) $DISK.zst"
