"""Messages kept instead of delivered: `Quarantine(dir).store(...)`, list, show, release.

    quarantine = Quarantine(Path("/var/lib/mailgate/quarantine"), retention=30 * 86400)
    entry_id = quarantine.store(sender=..., recipients=(...), content=raw, result=scan_result)
    queue_id = await quarantine.release(entry_id, Queue(queue_dir))

See store.py for the layout and durability, cli.py for `mailgate quarantine`.
"""

from proxies.quarantine.store import NoSuchEntry, Quarantine, QuarantineEntry, QuarantineError

__all__ = ["NoSuchEntry", "Quarantine", "QuarantineEntry", "QuarantineError"]
