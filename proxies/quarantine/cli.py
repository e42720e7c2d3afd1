"""`mailgate quarantine ...`: look at, release and delete quarantined mail.

Works on the quarantine directory directly, beside the running daemon. `release` puts the
message into the SMTP proxy's queue for its original recipients (the queue's own durable
accept) and pokes the daemon (SIGUSR1) so it is delivered at once; the entry then leaves the
quarantine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from netsetup.configfile import DEFAULT_CONFIG_PATH
from proxies.cliutil import report_failures
from proxies.config import Config, ConfigError, load_config_for_tool
from proxies.quarantine.store import NoSuchEntry, Quarantine, QuarantineEntry, QuarantineError
from proxies.queue import Queue, QueueError, poke_master

DEFAULT_QUARANTINE_DIR = Path("/var/lib/mailgate/quarantine")
DEFAULT_QUEUE_DIR = Path("/var/spool/mailgate")
DEFAULT_RETENTION = 30 * 86400.0
PROG = "mailgate quarantine"


class UserError(Exception):
    """A mistake of the user's: printed as `mailgate quarantine: ...`, exit status 1."""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the quarantine is")
    where.add_argument("--dir", type=Path, metavar="DIR", dest="quarantine_dir",
                       help="the quarantine directory (default: quarantine.dir from the config "
                            f"file, else {DEFAULT_QUARANTINE_DIR})")
    where.add_argument("--config", type=Path, metavar="PATH",
                       help=f"the config file to read quarantine.dir, quarantine.retention and "
                            f"smtp.queue_dir from (default: {DEFAULT_CONFIG_PATH} if it exists)")
    where.add_argument("--json", action="store_true",
                       help="print JSON for scripts instead of text")
    parser = subparsers.add_parser(
        "quarantine",
        help="list, show, release or delete quarantined mail",
        description=(
            "Messages the content filter kept instead of delivering ([policy] actions "
            "'quarantine', or a message that kept timing the scanners out) wait here with "
            "their envelope and the scanners' verdict, until released, deleted, or older "
            "than quarantine.retention (then 'list' and the daemon's start remove them)."),
        epilog=(
            "examples:\n"
            "  mailgate quarantine list\n"
            "  mailgate quarantine show 20250131-235959-1a2b3c4d\n"
            "  mailgate quarantine release 20250131-235959-1a2b3c4d   deliver it after all\n"
            "  mailgate quarantine delete 20250131-235959-1a2b3c4d"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="quarantine_command", required=True, metavar="VERB")
    verbs.add_parser("list", parents=[common], help="list quarantined messages",
                     description="One line per message: id, time, verdict, sender, "
                                 "recipients. Purges entries older than the retention first.")
    show = verbs.add_parser("show", parents=[common], help="show one message: envelope, "
                            "verdict, scanner output and content")
    show.add_argument("entry_id", metavar="ID")
    show.add_argument("--no-content", action="store_true", help="leave out the content")
    release = verbs.add_parser(
        "release", parents=[common], help="deliver a message to its recipients after all",
        description="Queue the message for its original recipients (or --to) and remove it "
                    "from the quarantine; the running daemon is told to deliver it now.")
    release.add_argument("entry_id", metavar="ID")
    release.add_argument("--to", action="append", metavar="ADDRESS", default=None,
                         help="deliver to this address instead (repeatable)")
    release.add_argument("--queue-dir", type=Path, metavar="DIR",
                         help="the SMTP queue (default: smtp.queue_dir from the config file, "
                              f"else {DEFAULT_QUEUE_DIR})")
    delete = verbs.add_parser("delete", parents=[common], help="remove messages for good")
    delete.add_argument("entry_ids", nargs="+", metavar="ID")
    parser.set_defaults(handler=run)


def _config(args: argparse.Namespace) -> Config | None:
    try:
        return load_config_for_tool(args.config)
    except ConfigError as exc:
        raise UserError(f"the config file has problems:\n{exc}") from None


def open_quarantine(args: argparse.Namespace, config: Config | None) -> Quarantine:
    settings = config.scan.quarantine if config is not None else None
    directory = args.quarantine_dir or (settings.dir if settings else DEFAULT_QUARANTINE_DIR)
    retention = settings.retention if settings else DEFAULT_RETENTION
    if not directory.is_dir():
        raise UserError(f"no quarantine at {directory} (use --dir DIR, or set quarantine.dir "
                        "in the config file)")
    return Quarantine(directory, retention=retention, create=False)


def run(args: argparse.Namespace) -> int:
    def action() -> int:
        config = _config(args)
        quarantine = open_quarantine(args, config)
        return _VERBS[args.quarantine_command](quarantine, args, config)

    return report_failures(PROG, "quarantine", action, (UserError, QuarantineError, QueueError))


def _time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _what(entry: QuarantineEntry) -> str:
    result = entry.result
    if result.verdict == "virus":
        return f"virus {result.virus}"
    if result.verdict == "spam":
        return f"spam {result.score:g}" if result.score is not None else "spam"
    return f"{result.verdict}: {entry.reason}" if entry.reason != result.verdict \
        else result.verdict


def _list(quarantine: Quarantine, args: argparse.Namespace, config: Config | None) -> int:
    entries = quarantine.list()
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return 0
    if not entries:
        print("Quarantine is empty")
        return 0
    for entry in entries:
        print(f"{entry.id}  {_time(entry.time)}  {entry.size:>8}  {_what(entry)}")
        print(f"    from <{entry.sender}> to {', '.join(f'<{r}>' for r in entry.recipients)}")
    print(f"-- {len(entries)} message{'s' if len(entries) != 1 else ''}")
    return 0


def _show(quarantine: Quarantine, args: argparse.Namespace, config: Config | None) -> int:
    entry = quarantine.entry(args.entry_id)
    content = b"" if args.no_content else quarantine.content(args.entry_id)
    if args.json:
        data = entry.as_json()
        if not args.no_content:
            data["content"] = content.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return 0
    result = entry.result
    lines = [
        f"id:           {entry.id}",
        f"time:         {_time(entry.time)}",
        f"source:       {entry.source}",
        f"verdict:      {_what(entry)}",
        f"scanners:     {', '.join(result.scanners) or '-'}",
        f"sender:       <{entry.sender}>",
        f"recipients:   {', '.join(f'<{r}>' for r in entry.recipients)}",
        f"client:       {entry.client_address or '-'}" + (f" (HELO {entry.helo})"
                                                          if entry.helo else ""),
        "destination:  " + (f"{entry.original_destination[0]}:{entry.original_destination[1]}"
                            if entry.original_destination else "(not intercepted)"),
        f"size:         {entry.size} bytes",
    ]
    lines += [f"output:       {line}" for line in result.output]
    print("\n".join(lines))
    if not args.no_content:
        print("-- content --", flush=True)
        sys.stdout.buffer.write(content.replace(b"\r\n", b"\n"))
        sys.stdout.buffer.flush()
    return 0


def _queue_dir(args: argparse.Namespace, config: Config | None) -> Path:
    if args.queue_dir is not None:
        return Path(args.queue_dir)
    return config.smtp.queue_dir if config is not None else DEFAULT_QUEUE_DIR


def _release(quarantine: Quarantine, args: argparse.Namespace, config: Config | None) -> int:
    queue_dir = _queue_dir(args, config)
    if not queue_dir.is_dir():
        raise UserError(f"no queue at {queue_dir} (use --queue-dir DIR, or set smtp.queue_dir "
                        "in the config file)")
    entry = quarantine.entry(args.entry_id)
    if entry.source != "smtp" and not args.to:
        raise UserError(f"{entry.id} was kept by the {entry.source} proxy; give the address "
                        "to deliver it to with --to")

    async def release() -> str:
        queue = Queue(queue_dir, create=False)
        try:
            return await quarantine.release(entry.id, queue, args.to)
        finally:
            queue.close()

    queue_id = asyncio.run(release())
    pid = poke_master(queue_dir)
    told = f"daemon (pid {pid}) told" if pid else "no daemon running: delivered when it starts"
    if args.json:
        print(json.dumps({"id": entry.id, "queue_id": queue_id, "daemon_pid": pid}))
    else:
        print(f"released {entry.id} as queue id {queue_id}; {told}")
    return 0


def _delete(quarantine: Quarantine, args: argparse.Namespace, config: Config | None) -> int:
    status = 0
    deleted = []
    for entry_id in args.entry_ids:
        try:
            found = quarantine.delete(entry_id)
        except NoSuchEntry:
            found = False
        if found:
            deleted.append(entry_id)
        else:
            print(f"{PROG}: {entry_id}: no such entry", file=sys.stderr)
            status = 1
    if args.json:
        print(json.dumps({"deleted": deleted}))
    else:
        for entry_id in deleted:
            print(f"deleted {entry_id}")
    return status


_VERBS = {"list": _list, "show": _show, "release": _release, "delete": _delete}
