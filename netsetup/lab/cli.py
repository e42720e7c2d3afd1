"""`mailgate lab ...`: bring a lab up, look at it, take it down."""

from __future__ import annotations

import argparse
import json

from netsetup.lab.topology import Lab, LabError, load_lab, remove_all_labs, running_labs


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = subparsers.add_parser(
        "lab",
        help="network-namespace lab: sender, gateway and server hosts",
        description=(
            "Build a lab of network namespaces to try mailgate without touching this machine's "
            "own network: a sender host, a gateway host (where mailgate runs) and a server "
            "host, all on documentation addresses (192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32). "
            "Run a program in a host with 'ip netns exec NAMESPACE PROGRAM'."
        ),
    )
    verbs = lab.add_subparsers(dest="lab_command", required=True, metavar="VERB")
    up = verbs.add_parser("up", help="create a lab and print its hosts")
    up.add_argument("--mode", choices=("router", "bridge"), default="router",
                    help="router: sender and server in two subnets routed by the gateway; "
                         "bridge: one subnet, the gateway bridges it (default: router)")
    up.add_argument("--name", help="lab name, 1-8 letters or digits (default: random)")
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    down = verbs.add_parser("down", help="remove a lab, its namespaces and every process in them")
    down.add_argument("name", nargs="?", help="the lab to remove")
    down.add_argument("--all", action="store_true", help="remove every lab on this machine")
    status = verbs.add_parser("status", help="list the labs on this machine")
    status.add_argument("--json", action="store_true")
    lab.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab_command == "up":
            lab = Lab(args.mode, name=args.name).up()
            if args.json:
                print(json.dumps(lab.describe(), indent=2))
            else:
                print(f"lab {lab.name} is up ({lab.mode} mode):")
                for role, host in lab.hosts.items():
                    addrs = ", ".join(a for a in (host.ipv4, host.ipv6) if a) or "(no address)"
                    print(f"  {role:8} namespace {host.netns:24} {addrs}")
                print(f"enter a host:  ip netns exec {lab.gateway.netns} bash")
                print(f"remove it:     mailgate lab down {lab.name}")
            return 0
        if args.lab_command == "down":
            if args.all:
                removed = remove_all_labs()
                names = f": {', '.join(removed)}" if removed else ""
                print(f"removed {len(removed)} lab(s){names}")
                return 0
            if not args.name:
                print("mailgate lab down: name a lab, or use --all")
                return 2
            load_lab(args.name).down()
            print(f"lab {args.name} removed")
            return 0
        labs = running_labs()
        if args.json:
            print(json.dumps(labs, indent=2))
        elif not labs:
            print("no labs")
        else:
            for name, namespaces in sorted(labs.items()):
                print(f"{name}: {' '.join(sorted(namespaces))}")
        return 0
    except LabError as exc:
        print(f"mailgate lab: {exc}")
        return 1
