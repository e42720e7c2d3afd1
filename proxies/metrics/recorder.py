"""What the proxies count, as calls at a few coarse points: per connection, per message, per
delivery attempt, per scan, per worker restart. Never per byte or per line.

`Recorder` is what every hook calls and what runs when metrics are off: each method does
nothing, so the price of a hook then is one Python call (about 0.1 us), and prometheus_client
is not even imported. `PrometheusRecorder` is the same interface backed by prometheus_client
metrics; in multiprocess mode (proxies.metrics.shared) each increment is a write into this
process's mmapped file (about 1 us), which is why the SMTP front end adds up its replies per
connection and reports them once, at the end.

Label values are small fixed sets (a reply class, an outcome, a scanner's name), never an
address or a queue id: each label value is a time series in Prometheus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Histogram buckets for a scan (seconds): clamd answers a small message in milliseconds,
# spamd in tenths of a second, and [scan] timeout is 30 s by default.
SCAN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Reply classes by first digit; an SMTP reply code is 2xx..5xx (RFC 5321 4.2.1).
REPLY_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def new_reply_counts() -> list[int]:
    """A connection's replies by class, indexed by the code's first digit (0 unused)."""
    return [0, 0, 0, 0, 0, 0]


class Recorder:
    """The hooks, doing nothing: metrics are off."""

    enabled = False

    def smtp_connection(self, result: str) -> None:
        """One client connection: "accepted" or "refused" (over a connection limit)."""

    def smtp_replies(self, counts: Sequence[int]) -> None:
        """A finished connection's replies, `counts[d]` of class d (new_reply_counts)."""

    def smtp_message(self, result: str, reason: str) -> None:
        """The answer to one message's final dot: result "accepted", "rejected",
        "tempfailed", "quarantined" or "dropped", and why."""

    def smtp_recipient_refused(self, reason: str) -> None:
        """One RCPT refused by policy (relay denied, bad address, too many)."""

    def filter_verdict(self, verdict: str, action: str) -> None:
        """The content filter's view of one SMTP message: combined verdict and action."""

    def deliveries(self, delivered: int, deferred: int, bounced: int) -> None:
        """One delivery attempt's recipients by what became of them."""

    def bounce_notification(self, result: str) -> None:
        """Bounced recipients of one delivery attempt, and their notification: "sent", or
        why none was made (proxies.queue.model NO_DSN_*: "rate_limited", "null_sender",
        "spam_verdict", "virus_verdict")."""

    def scan(self, scanner: str, verdict: str, seconds: float) -> None:
        """One scanner's (or the content rules') answer on one message and how long it took."""

    def pop3_retrieval(self, outcome: str, verdict: str) -> None:
        """One RETR/TOP through the POP3 proxy: what the client got, and the scan verdict."""

    def pop3_scan_ahead(self, result: str) -> None:
        """A message fetched ahead ([pop3] scan_ahead): "used" (the client asked for it),
        "dropped" (it asked for something else), or, after "used", "differed" (the server's
        RETR of it was not what its TOP gave)."""

    def worker_restart(self, worker: str) -> None:
        """The master started a worker in place of one that died."""


class PrometheusRecorder(Recorder):
    """The hooks as prometheus_client metrics (in whatever value mode prometheus_client is in:
    proxies.metrics.shared puts it in multiprocess mode first)."""

    enabled = True

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # Not the default registry: in multiprocess mode the exporter collects the files, and
        # a second process-local copy of these would only be misleading.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._connections = Counter(
            "mailgate_smtp_connections", "SMTP client connections, by whether they were "
            "accepted or refused at a connection limit", ["result"], registry=r)
        self._replies = Counter(
            "mailgate_smtp_replies", "SMTP replies sent to clients, by class (2xx, 3xx, 4xx, "
            "5xx; counted when the connection ends)", ["class"], registry=r)
        self._messages = Counter(
            "mailgate_smtp_messages", "Messages at their final dot, by the result of the reply "
            "(accepted, rejected, tempfailed, quarantined, dropped) and the reason",
            ["result", "reason"], registry=r)
        self._recipients_refused = Counter(
            "mailgate_smtp_recipients_refused", "RCPT commands refused by policy, by reason",
            ["reason"], registry=r)
        self._filter = Counter(
            "mailgate_smtp_filter_verdicts", "SMTP messages through the content filter, by "
            "combined verdict (clean, spam, virus, banned, failed) and action taken",
            ["verdict", "action"], registry=r)
        self._deliveries = Counter(
            "mailgate_deliveries", "Recipients of delivery attempts, by outcome (delivered, "
            "deferred, bounced)", ["outcome"], registry=r)
        self._bounce_notifications = Counter(
            "mailgate_bounce_notifications", "Bounces, by whether a notification (DSN) went "
            "to the sender (sent) or why not (rate_limited, null_sender, spam_verdict, "
            "virus_verdict)", ["result"], registry=r)
        self._scans = Counter(
            "mailgate_scan_verdicts", "Scanner answers, by scanner and verdict",
            ["scanner", "verdict"], registry=r)
        self._scan_seconds = Histogram(
            "mailgate_scan_duration_seconds", "Time one scanner took for one message",
            ["scanner"], buckets=SCAN_BUCKETS, registry=r)
        self._pop3 = Counter(
            "mailgate_pop3_retrievals", "RETR/TOP responses through the POP3 proxy, by what "
            "the client got (deliver, tag, unscanned, replace, tempfail) and scan verdict",
            ["outcome", "verdict"], registry=r)
        self._pop3_ahead = Counter(
            "mailgate_pop3_scan_ahead", "Messages fetched ahead ([pop3] scan_ahead), by "
            "whether the client then asked for them (used) or not (dropped), and whether the "
            "server's RETR then differed from its TOP (differed)", ["result"],
            registry=r)
        self._restarts = Counter(
            "mailgate_worker_restarts", "Workers started by the master in place of one that "
            "died", ["worker"], registry=r)
        # Children by label values: labels() validates and locks each time, a dict does not.
        self._children: dict[tuple[Any, ...], Any] = {}
        # Series that should read 0 rather than be missing until the first event, so that
        # rate() and alerts see them from the start.
        for result in ("accepted", "refused"):
            self._child(self._connections, result)
        for cls in REPLY_CLASSES[1:]:
            self._child(self._replies, cls)
        self._child(self._messages, "accepted", "queued")
        for outcome in ("delivered", "deferred", "bounced"):
            self._child(self._deliveries, outcome)
        self._child(self._restarts, "smtp")
        for result in ("sent", "rate_limited"):
            self._child(self._bounce_notifications, result)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def smtp_connection(self, result: str) -> None:
        self._child(self._connections, result).inc()

    def smtp_replies(self, counts: Sequence[int]) -> None:
        for digit in range(1, 6):
            if counts[digit]:
                self._child(self._replies, REPLY_CLASSES[digit - 1]).inc(counts[digit])

    def smtp_message(self, result: str, reason: str) -> None:
        self._child(self._messages, result, reason).inc()

    def smtp_recipient_refused(self, reason: str) -> None:
        self._child(self._recipients_refused, reason).inc()

    def filter_verdict(self, verdict: str, action: str) -> None:
        self._child(self._filter, verdict, action).inc()

    def deliveries(self, delivered: int, deferred: int, bounced: int) -> None:
        for outcome, count in (("delivered", delivered), ("deferred", deferred),
                               ("bounced", bounced)):
            if count:
                self._child(self._deliveries, outcome).inc(count)

    def bounce_notification(self, result: str) -> None:
        self._child(self._bounce_notifications, result).inc()

    def scan(self, scanner: str, verdict: str, seconds: float) -> None:
        self._child(self._scans, scanner, verdict).inc()
        self._child(self._scan_seconds, scanner).observe(seconds)

    def pop3_retrieval(self, outcome: str, verdict: str) -> None:
        self._child(self._pop3, outcome, verdict).inc()

    def pop3_scan_ahead(self, result: str) -> None:
        self._child(self._pop3_ahead, result).inc()

    def worker_restart(self, worker: str) -> None:
        self._child(self._restarts, worker).inc()
