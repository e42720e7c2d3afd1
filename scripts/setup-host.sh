#!/usr/bin/env bash
# Installs what mailgate's demo and tests need on a Debian 12 machine, as root:
# Debian packages (the real mail peers and netfilter tools) and a project venv in .venv.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  iproute2 iptables ebtables nftables libnetfilter-queue-dev pkg-config gcc
  python3 python3-venv python3-dev
  postfix swaks dovecot-pop3d clamav-daemon spamassassin spamd rspamd fetchmail getmail6
  openssl
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (the lab needs network namespaces, the peers need their packages)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  # Package scripts must not start system daemons: they would take ports 25/110/783 on the
  # host and freshclam would try the network. policy-rc.d exit 101 forbids it.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

stamp=.venv/.mailgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: creating the project venv in .venv"
  python3 -m venv .venv
  # pip's output is kept in a log and shown only when it fails.
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'; } \
      > .venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup: pip install failed (log above, also in .venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
