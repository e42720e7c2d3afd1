"""The `mailgate` command: run the proxies, manage the queue, the lab and the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from interceptor import cli as interceptor_cli
from netsetup.configfile import DEFAULT_CONFIG_PATH, ConfigError
from netsetup.lab import cli as lab_cli
from proxies import configcheck, tcprelay
from proxies.quarantine import cli as quarantine_cli
from proxies.queue import cli as queue_cli

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
    run = commands.add_parser(
        "run", help="run the proxies in the foreground (systemd style)",
        description=(
            "Run the SMTP proxy (and the other configured proxies) in the foreground: logs go "
            "to stderr, SIGTERM stops cleanly, readiness is reported to systemd (sd_notify). "
            "The network must be set up first with 'netsetup apply'."
        ))
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                     help=f"the TOML config file (default: {DEFAULT_CONFIG_PATH})")
    run.set_defaults(handler=_run)
    configcheck.add_commands(commands)  # config check
    lab_cli.add_commands(commands)
    queue_cli.add_commands(commands)
    quarantine_cli.add_commands(commands)
    tcprelay.add_commands(commands)
    interceptor_cli.add_commands(commands)  # intercept, status
    demo = commands.add_parser(
        "demo", help="bring up a lab, show interception working, and clean up",
        description="A guided tour in a throwaway lab: needs root; changes nothing outside it.")
    demo.set_defaults(handler=_demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    from proxies.config import load_config
    from proxies.run import run

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mailgate: {problem}", file=sys.stderr)
        return 2
    return run(config)


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
