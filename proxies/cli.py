"""The `mailgate` command: run the proxies, manage the queue, the lab and the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from netsetup.lab import cli as lab_cli

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate",
        description=(
            "mailgate filters e-mail in transit: it transparently intercepts SMTP (tcp 25) and "
            "POP3 (tcp 110) on a Linux router or bridge. 'netsetup' configures the network; "
            "this command runs and inspects the proxies."
        ),
        epilog="Try 'mailgate demo' for a guided tour in a throwaway lab.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lab_cli.add_commands(commands)
    demo = commands.add_parser(
        "demo", help="bring up a lab, show interception working, and clean up",
        description="A guided tour in a throwaway lab: needs root; changes nothing outside it.")
    demo.set_defaults(handler=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from proxies.demo import run_demo

    return run_demo()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("mailgate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
