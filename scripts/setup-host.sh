#!/usr/bin/env bash
# Installs what mailgate's demo and tests need on a Debian 12 machine, as root:
# Debian packages (the real mail peers and netfilter tools) and a project venv in .venv.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  iproute2 iptables ebtables nftables libnetfilter-queue-dev pkg-config gcc
  python3 python3-venv python3-dev
  postfix swaks dovecot-pop3d clamav-daemon spamassassin spamd rspamd fetchmail
  # swaks speaks IPv6 only with this, a mere Recommends (and we install without those).
  libio-socket-inet6-perl
  openssl
  # The metrics lab test scrapes the gateway with a real Prometheus (offline, in the lab).
  prometheus
  # rspamd's greylisting keeps its triplets in Redis; the lab runs a private redis-server.
  redis-server
)

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (the lab needs network namespaces, the peers need their packages)" >&2
  exit 1
fi

# Without this, postfix's package configures itself as an Internet site.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
scripts/install-debs.sh "${packages[@]}"

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
