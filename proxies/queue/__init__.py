"""The durable message queue of the SMTP proxy (Postfix-style directories, group commit).

    queue = Queue(Path("/var/spool/mailgate"), hostname="gw.example.net")
    queue.recover()                                   # once, in the delivery process
    queue_id = await queue.accept(envelope, content)  # durable when it returns: answer 250
    for queue_id in queue.due():
        claimed = queue.claim(queue_id)               # None if someone else took it
        ...deliver claimed.content to claimed.pending...
        queue.record_attempt(queue_id, {rcpt: DeliveryResult(250, "2.0.0 Ok"), ...})

See store.py for the directory layout and the durability argument, queuefile.py for the
file format, dsn.py for bounces and cli.py for `mailgate queue`.
"""

from proxies.queue.dsn import DsnRecipient, build_dsn
from proxies.queue.model import (
    AttemptOutcome,
    ClaimedMessage,
    CorruptQueueFile,
    DeliveryResult,
    DeliveryState,
    Envelope,
    NoSuchMessage,
    QueueEntry,
    QueueError,
    QueueFullError,
    QueueWriteError,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
)
from proxies.queue.store import PID_FILE, Queue, poke_master

__all__ = [
    "PID_FILE",
    "AttemptOutcome",
    "ClaimedMessage",
    "CorruptQueueFile",
    "DeliveryResult",
    "DeliveryState",
    "DsnRecipient",
    "Envelope",
    "NoSuchMessage",
    "Queue",
    "QueueEntry",
    "QueueError",
    "QueueFullError",
    "QueueWriteError",
    "RecipientState",
    "RecipientStatus",
    "RecoveryReport",
    "build_dsn",
    "poke_master",
]
