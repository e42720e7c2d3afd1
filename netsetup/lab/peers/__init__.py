"""Real mail peers run from private folders inside lab hosts.

Each helper writes the peer's config into a folder the caller gives (tests: tmp_path),
starts the peer with `lab.spawn` (so `lab.down()` kills it however the test ends), waits
until it really answers (a banner, PING/PONG, a DNS reply; never a blind sleep) and stops it
cleanly:

- postfix.Postfix.receiver / .sender / .relay -> PostfixInstance
- sink.SmtpSink.start, sink.smtp_source, sink.swaks
- dovecot.Dovecot.start -> DovecotInstance (POP3)
- clamd.Clamd.start -> ClamdInstance
- spamd.Spamd.start -> SpamdInstance
- rspamd.Rspamd.start -> RspamdInstance (HTTP: /ping, /checkv2)
- dns.DnsServer.start (also `python -m netsetup.lab.peers.dns`)
- prometheus.Prometheus.start -> PrometheusInstance (scrapes, answers /api/v1/query)

Peers see their folder at `_common.PEER_MOUNT` (a bind mount private to each peer's
commands), so the configs written there name paths under /run/mailgate-peer; the Python side
reads and writes the same files through the caller's folder. Why: see `_common.PEER_MOUNT`.
A peer that fails to start raises `_common.PeerError` with the tail of its logs.
"""

from netsetup.lab.peers._common import PeerError

__all__ = ["PeerError"]
