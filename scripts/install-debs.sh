#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet, as root, without
# letting any package script start a system daemon. Used by setup-host.sh and the image's
# setup-build-host.sh.
set -euo pipefail

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -gt 0 ] || exit 0

echo "setup: installing Debian packages: ${missing[*]}"
# Package scripts must not start system daemons: they would take ports 25/110/783 on the host
# and freshclam would try the network. policy-rc.d exit 101 forbids it; one we put in place is
# removed again however the install ends.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
