"""`mailgate queue ...`: look at and manage the mail queue, like Postfix's mailq/postsuper.

Works on the queue directory directly, from another process than the daemon; after changing
the schedule (flush, release) it pokes the daemon (SIGUSR1 to the pid in master.pid) so the
change takes effect at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from netsetup.configfile import DEFAULT_CONFIG_PATH
from proxies.cliutil import report_failures
from proxies.config import ConfigError, load_config_for_tool
from proxies.queue.model import NoSuchMessage, QueueError
from proxies.queue.store import Queue, poke_master
from proxies.smtp.verify import VERIFICATION_TEXT

DEFAULT_QUEUE_DIR = Path("/var/spool/mailgate")
PROG = "mailgate queue"


class UserError(Exception):
    """A mistake of the user's: printed as `mailgate queue: ...`, exit status 1."""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the queue is")
    where.add_argument("--queue-dir", type=Path, metavar="DIR",
                       help="the queue directory (default: smtp.queue_dir from the config "
                            f"file, else {DEFAULT_QUEUE_DIR})")
    where.add_argument("--config", type=Path, metavar="PATH",
                       help=f"the config file to read smtp.queue_dir from "
                            f"(default: {DEFAULT_CONFIG_PATH} if it exists)")
    queue = subparsers.add_parser(
        "queue",
        help="list, show, retry, hold, release or delete queued mail",
        description=(
            "The SMTP proxy keeps every accepted message in its queue until each recipient's "
            "server has accepted or refused it. A message that cannot be delivered now is "
            "retried with a growing delay (smtp.retry_min doubling up to smtp.retry_max); "
            "after smtp.queue_lifetime its sender gets a bounce. These commands work while "
            "the daemon runs."
        ),
        epilog=(
            "examples:\n"
            "  mailgate queue list                  what is queued, and why (like mailq)\n"
            "  mailgate queue show 0625F1C2A3B4D9E8F7A6B\n"
            "  mailgate queue flush                 retry every deferred message now\n"
            "  mailgate queue hold ID / release ID  stop / resume trying a message\n"
            "  mailgate queue delete ID | --all     remove messages without a bounce"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = queue.add_subparsers(dest="queue_command", required=True, metavar="VERB")
    listing = verbs.add_parser(
        "list", parents=[common], help="list queued messages (like mailq)",
        description="One entry per message: queue id (* being delivered, ! on hold), size, "
                    "arrival time, sender, the last error, and the recipients still waiting, "
                    "each with how it was checked at RCPT: [verified live] (the server was "
                    "asked), [verified from cache] (it had said yes before), or [not "
                    "verified: why]. A verified recipient is one the server agreed to take.")
    listing.add_argument("--json", action="store_true",
                         help="print a JSON array of messages, with every recipient's state")
    show = verbs.add_parser("show", parents=[common], help="show one message: envelope, state "
                            "and content", description="Print a message's envelope and "
                            "delivery state, then its content as it will be sent.")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--json", action="store_true",
                      help="print envelope, state and content as one JSON object")
    show.add_argument("--no-content", action="store_true", help="leave out the content")
    flush = verbs.add_parser(
        "flush", parents=[common], help="retry all deferred messages now",
        description="Make every deferred message due now and tell the daemon (like "
                    "'postqueue -f'). Held messages stay held.")
    flush.set_defaults(queue_id=None)
    delete = verbs.add_parser(
        "delete", parents=[common], help="remove messages from the queue (no bounce is sent)",
        description="Remove messages for good, also one being delivered (like 'postsuper -d'). "
                    "The sender is not told.")
    delete.add_argument("queue_ids", nargs="*", metavar="ID")
    delete.add_argument("--all", action="store_true", help="remove every queued message")
    hold = verbs.add_parser(
        "hold", parents=[common], help="stop trying messages until released",
        description="Put messages on hold (like 'postsuper -h'): they stay queued, are not "
                    "tried, and do not expire until released.")
    hold.add_argument("queue_ids", nargs="+", metavar="ID")
    release = verbs.add_parser(
        "release", parents=[common], help="release held messages, to be tried now",
        description="Take messages off hold (like 'postsuper -H'); they are tried at once.")
    release.add_argument("queue_ids", nargs="+", metavar="ID")
    queue.set_defaults(handler=run)


def queue_dir_from(args: argparse.Namespace) -> Path:
    if args.queue_dir is not None:
        return Path(args.queue_dir)
    try:
        config = load_config_for_tool(args.config)
    except ConfigError as exc:
        raise UserError(f"the config file has problems:\n{exc}") from None
    return config.smtp.queue_dir if config is not None else DEFAULT_QUEUE_DIR


def run(args: argparse.Namespace) -> int:
    def action() -> int:
        directory = queue_dir_from(args)
        if not directory.is_dir():
            raise UserError(f"no queue at {directory} (use --queue-dir DIR, or set "
                            "smtp.queue_dir in the config file)")
        return _VERBS[args.queue_command](Queue(directory, create=False), args)

    return report_failures(PROG, "queue", action, (UserError, QueueError))


def _list(queue: Queue, args: argparse.Namespace) -> int:
    entries = queue.list()
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return 0
    if not entries:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<23}{'--Size--':>8} {'----Arrival Time----':<20} "
          "-Sender/Recipient-------")
    for entry in entries:
        mark = {"active": "*", "hold": "!"}.get(entry.status, " ")
        print(f"{entry.queue_id + mark:<23}{entry.size:>8} {_time(entry.arrival):<20} "
              f"{entry.sender or 'MAILER-DAEMON'}")
        if entry.last_error:
            print(f"{'':<53}({_one_line(entry.last_error)})")
        for rcpt in entry.recipients:
            if not rcpt.status.is_final:
                print(f"{'':<53}{rcpt.address}"
                      + _verification(entry.envelope.verification_of(rcpt.address)))
        print()
    kbytes = (sum(e.size for e in entries) + 1023) // 1024
    count = len(entries)
    print(f"-- {kbytes} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return 0


def _show(queue: Queue, args: argparse.Namespace) -> int:
    try:
        entry, content = queue.show(args.queue_id, with_content=not args.no_content)
    except NoSuchMessage:
        raise UserError(f"no message {args.queue_id} in the queue at {queue.directory}") from None
    if args.json:
        data: dict[str, Any] = entry.as_json()
        if not args.no_content:
            data["content"] = content.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return 0
    env = entry.envelope
    lines = [
        f"queue id:     {entry.queue_id}",
        f"status:       {entry.status}"
        + (f", next attempt {_time(entry.next_attempt)}" if entry.next_attempt else ""),
        f"size:         {entry.size} bytes",
        f"arrival:      {_time(entry.arrival)}",
        f"sender:       <{env.sender}>",
        f"client:       {_hostport(env.client_address, env.client_port) or 'local'}"
        + (f" (HELO {env.helo})" if env.helo else ""),
        "destination:  " + (_hostport(*env.original_destination)
                            if env.original_destination else "(not intercepted)"),
        f"protocol:     {env.protocol}" + (", TLS" if env.tls else "")
        + (", SMTPUTF8" if env.smtputf8 else "") + (", 8BITMIME" if env.body_8bit else ""),
        f"attempts:     {entry.attempts}"
        + (f", last error: {_one_line(entry.last_error)}" if entry.last_error else ""),
    ]
    if env.verdict:
        lines.append(f"scan verdict: {env.verdict}"
                     + (" (never bounced to the sender)" if env.verdict in ("spam", "virus")
                        else ""))
    lines.append("recipients:")
    for rcpt in entry.recipients:
        reply = f"{rcpt.code} {rcpt.text}" if rcpt.code and rcpt.connected else rcpt.text
        lines.append(f"  <{rcpt.address}> {rcpt.status}"
                     + _verification(env.verification_of(rcpt.address))
                     + (f"  {_one_line(reply)}" if reply else ""))
    print("\n".join(lines))
    if not args.no_content:
        print("-- content --", flush=True)
        sys.stdout.buffer.write(content.replace(b"\r\n", b"\n"))
        sys.stdout.buffer.flush()
    return 0


def _flush(queue: Queue, args: argparse.Namespace) -> int:
    count = queue.flush()
    print(f"{count} deferred message(s) due now; {_poke(queue)}")
    return 0


def _delete(queue: Queue, args: argparse.Namespace) -> int:
    if args.all and args.queue_ids:
        raise UserError("give queue ids or --all, not both")
    if args.all:
        print(f"deleted {queue.delete_all()} message(s)")
        return 0
    if not args.queue_ids:
        raise UserError("name the messages to delete (queue ids from 'mailgate queue list'), "
                        "or use --all")
    return _each(queue, args.queue_ids, queue.delete, "deleted", poke=False)


def _hold(queue: Queue, args: argparse.Namespace) -> int:
    return _each(queue, args.queue_ids, queue.hold, "on hold", poke=False)


def _release(queue: Queue, args: argparse.Namespace) -> int:
    return _each(queue, args.queue_ids, queue.release, "released", poke=True,
                 unknown="is not on hold")


def _each(queue: Queue, queue_ids: list[str], action: Any, done: str, *, poke: bool,
          unknown: str = "is not in the queue") -> int:
    status = 0
    changed = 0
    for queue_id in queue_ids:
        if action(queue_id):
            print(f"{queue_id}: {done}")
            changed += 1
        else:
            print(f"{PROG}: {queue_id} {unknown}", file=sys.stderr)
            status = 1
    if poke and changed:
        print(_poke(queue))
    return status


def _poke(queue: Queue) -> str:
    pid = poke_master(queue.directory)
    return f"told the daemon (pid {pid})" if pid else "the daemon is not running"


def _time(timestamp: float | None) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _verification(how: str) -> str:
    """How the recipient was checked at RCPT, for a listing ('' when the file does not say:
    notifications, quarantine releases, messages queued by an older version)."""
    return f"  [{VERIFICATION_TEXT.get(how, how)}]" if how else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _hostport(host: str, port: int) -> str:
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_VERBS = {"list": _list, "show": _show, "flush": _flush, "delete": _delete, "hold": _hold,
          "release": _release}


def main(argv: list[str] | None = None) -> int:
    """`mailgate queue ...` on its own, for tests and for running without the main CLI."""
    parser = argparse.ArgumentParser(prog="mailgate")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result
