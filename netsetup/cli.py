"""`netsetup`: put the network plumbing for transparent interception in place, or take it away."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from netsetup import commands
from netsetup.apply import ApplyFailed
from netsetup.config import NetworkConfig
from netsetup.configfile import DEFAULT_CONFIG_PATH, ConfigError
from netsetup.iptables import IptablesError
from netsetup.links import LinkError
from netsetup.nft import NftError
from netsetup.plan import render, render_status, to_json
from netsetup.state import StateFileError, default_state_path

PROG = "netsetup"
# What reading the system may raise (changes run inside the executor, which reports its own).
SYSTEM_ERRORS = (OSError, NetlinkError, IptablesError, NftError, LinkError,
                 subprocess.TimeoutExpired)

DESCRIPTION = """\
Configure this machine so that mailgate's proxies receive the SMTP (tcp 25) and POP3 (tcp 110)
connections passing through it, as a router or as a transparent bridge, from the [network]
section of the mailgate config. netsetup compares what the config asks for with what is in
place and changes only the difference: sysctls, the bridge and its ports, addresses, policy
rules and routes (netlink), its own mangle chains MAILGATE and MAILGATE_DIVERT (legacy
iptables, IPv4 and IPv6) and, in bridge mode, the nftables tables 'bridge mailgate' and
'netdev mailgate'.

What netsetup adds or changes is remembered in a state file, so that 'teardown' removes exactly
that and puts changed values back, and nothing else."""

EPILOG = """\
examples:
  netsetup plan                       what apply would change, for /etc/mailgate/mailgate.toml
  netsetup --config gw.toml apply     put it in place (again: changes nothing)
  netsetup status; echo $?            0 when everything matches the config
  netsetup teardown                   remove it all, restore previous values

a minimal [network] for a bridge:
  [network]
  mode = "bridge"
  ports = ["eth0", "eth1"]
  bypass_sources = ["192.0.2.53/32"]
  (no address and no subnet needed: see egress_mark in the README)

exit status: 0 done (status: matches the config), 1 failed or (status) differs / not applied,
2 the config or the command line is wrong (nothing was touched)."""

VERBS = {
    "plan": ("show what apply would change, changing nothing",
             "Print, grouped by kind, every change 'apply' would make to bring this machine in "
             "line with the config: sysctls, links, addresses, routes, policy rules and the "
             "complete rules netsetup would install per table. Changes nothing."),
    "apply": ("make this machine match the config",
              "Carry out the plan. Every step has an undo: if one fails, the earlier ones are "
              "undone, the failure is reported and the exit status is 1. Running apply again "
              "changes nothing; after a config change it converges (removes what the config no "
              "longer asks for, adds what is new)."),
    "status": ("say whether what is in place matches the config",
               "List each part of the configuration as ok, missing, differs or stale (installed "
               "by netsetup, no longer in the config). Exit status 0 when everything matches, "
               "1 when anything differs or nothing was applied."),
    "teardown": ("remove what netsetup installed, put back what it changed",
                 "Remove netsetup's chains, nft table, policy rules, routes and addresses; "
                 "release the ports it put in the bridge, delete the bridge if netsetup created "
                 "it, restore every sysctl it changed to its previous value. Things that were "
                 "there before netsetup are left as they are. Does not read the config."),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, defaults=True)
    # The verbs' copies default to SUPPRESS: an option given before the verb is not reset.
    _add_common(common, defaults=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (summary, description) in VERBS.items():
        verb = verbs.add_parser(name, help=summary, description=description, parents=[common],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name in ("plan", "status"):
            verb.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                              help="print the result as JSON for scripts")
    return parser


def _add_common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--config", type=Path, metavar="PATH",
                        default=default(DEFAULT_CONFIG_PATH),
                        help=f"the mailgate config; only [network] is read "
                             f"(default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--state-file", type=Path, metavar="PATH", default=default(None),
                        help="where netsetup remembers what it installed (default: "
                             "/run/mailgate/netsetup-<network namespace inode>.json, one per "
                             "namespace)")


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    json_output = bool(getattr(args, "json", False))
    config: NetworkConfig | None = None
    try:
        if args.verb != "teardown":
            # The file, then the interfaces it names: all reported before anything is touched.
            config = commands.load_config(args.config)
        if os.geteuid() != 0:
            _error("needs root (CAP_NET_ADMIN) to read and change the network setup")
            return 1
        state_path = args.state_file or default_state_path()
        return _run(args.verb, config, state_path, args.config, json_output)
    except ConfigError as exc:
        for problem in exc.problems:
            _error(str(problem))
        return 2
    except StateFileError as exc:
        _error(str(exc))
        return 1
    except ApplyFailed as exc:
        _error(f"{args.verb} failed: {exc}")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 1
    except SYSTEM_ERRORS as exc:  # reading the current state failed: say what, no traceback
        _error(f"{args.verb}: cannot read the current network setup: {exc}")
        return 1


def _run(verb: str, config: NetworkConfig | None, state_path: Path, config_path: Path,
         json_output: bool) -> int:
    if verb == "plan":
        plan = commands.plan_changes(config, state_path)
        if json_output:
            print(to_json(plan))
        elif plan.empty:
            print(f"nothing to change: this machine matches {config_path}")
        else:
            print(f"{len(plan.changes)} change(s) to match {config_path}:")
            print(render(plan))
        return 0
    if verb == "status":
        plan = commands.plan_changes(config, state_path)
        if json_output:
            print(to_json(plan))
        else:
            print(render_status(plan))
            print(f"matches {config_path}" if plan.empty else
                  f"differs from {config_path}: {len(plan.changes)} change(s) pending "
                  "(see 'netsetup plan')")
        return 0 if plan.empty else 1
    fail_after = commands.fail_after_from_env()
    if verb == "apply":
        assert config is not None
        plan = commands.apply_config(config, state_path, fail_after)
        done = "applied" if not plan.empty else "already in place, nothing to change"
    else:
        plan = commands.teardown(state_path, fail_after)
        done = "removed" if not plan.empty else "nothing to remove"
    if plan.empty:
        print(done)
    else:
        print(f"{done} {len(plan.changes)} change(s):")
        print(render(plan, teardown=verb == "teardown"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
