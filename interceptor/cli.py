"""`mailgate intercept` (the NFQUEUE program) and `mailgate status` (what is running)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from netsetup.configfile import DEFAULT_CONFIG_PATH, ConfigError


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    intercept = subparsers.add_parser(
        "intercept", help="decide per new connection whether the proxies get it (NFQUEUE)",
        description=(
            "Bind the NFQUEUE that 'netsetup apply' points SYNs to when [interceptor] enabled = "
            "true, and decide for each new SMTP/POP3 connection: intercept it (the proxy gets "
            "it), let it pass to the server directly (bypass lists, per-service switch, "
            "schedule, or its proxy not accepting with fail = \"open\"), or refuse it "
            "(fail = \"closed\"). A proxy counts as not accepting when it does not listen, "
            "its accept queue is full or not drained, it is at its connection limit, or the "
            "connections given to it never complete. Established connections never come "
            "here. While this program is not running the kernel lets new connections "
            "through uninspected (fail = \"open\") or holds them until it is back "
            "(fail = \"closed\"). SIGHUP re-reads the config; counters and each proxy's "
            "health go to [interceptor] stats_file ('mailgate status' shows them)."),
        epilog="Needs root (CAP_NET_ADMIN) in the gateway's network namespace.")
    intercept.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                           help=f"the TOML config file (default: {DEFAULT_CONFIG_PATH})")
    intercept.add_argument("--trace", action="store_true",
                           help="print every decision with the packet decoded (slow; debugging)")
    # `mailgate run` starts this with its own pid: the interceptor then ends with it, even
    # when it is killed with SIGKILL (else it would stay bound, deciding for proxies that are
    # gone). Not for people.
    intercept.add_argument("--die-with-parent", type=int, metavar="PID", help=argparse.SUPPRESS)
    intercept.set_defaults(handler=_intercept)
    status = subparsers.add_parser(
        "status", help="show what is running: interceptor counters and health, proxies, "
                       "kernel queue, metrics",
        description="A quick look at the running gateway, from the config, the interceptor's "
                    "stats file, the kernel's NFQUEUE table and the listening sockets; with "
                    "[metrics] listen set, also the figures the metrics endpoint serves, "
                    "read from the same place it reads them.")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                        help=f"the TOML config file (default: {DEFAULT_CONFIG_PATH})")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_status)


def settings_from(path: Path) -> Any:
    from interceptor.service import Settings
    from proxies.config import load_config

    config = load_config(path)
    return Settings(config.network, config.interceptor,
                    {"smtp": config.smtp.max_connections})


def _config_problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"mailgate: {problem}", file=sys.stderr)
    return 2


def _intercept(args: argparse.Namespace) -> int:
    from interceptor.service import serve
    from proxies import logs

    if args.die_with_parent is not None:
        import ctypes
        import signal

        from proxies.run import PR_SET_PDEATHSIG

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != args.die_with_parent:  # it died before we asked
            return 1

    try:
        settings = settings_from(args.config)
    except ConfigError as exc:
        return _config_problems(exc)
    logs.setup("info")
    if not settings.interceptor.enabled:
        print("mailgate intercept: note: [interceptor] enabled is false, so netsetup queues no "
              "SYNs to this program", file=sys.stderr)
    return serve(lambda: settings_from(args.config), trace=args.trace)


def gather_status(path: Path) -> dict[str, Any]:
    from interceptor import queuestate, sockdiag
    from interceptor.service import read_stats
    from proxies.config import load_config
    from proxies.metrics.status import metrics_status

    settings = settings_from(path)
    config = settings.interceptor
    bound = queuestate.read().get(config.queue)
    stats = read_stats(config.stats_file)
    running = bool(stats and "stopped" not in stats and _alive(int(stats.get("pid", 0))))
    proxies = []
    for item in settings.network.intercept:
        for family in settings.network.families:
            kind = socket.AF_INET if family == 4 else socket.AF_INET6
            found = sockdiag.listeners(kind, item.listen_port)
            proxies.append({"service": item.service, "family": family, "port": item.listen_port,
                            "listening": bool(found),
                            "accept_queue": sum(s.rqueue for s in found)})
    return {
        "interceptor": {
            "enabled": config.enabled,
            "running": running,
            "fail": config.fail,
            "queue": config.queue,
            "queue_bound": bound is not None,
            "stats_file": str(config.stats_file),
            "stats_age": round(time.time() - stats["updated"], 1) if stats else None,
            "counters": stats.get("counters") if stats else None,
            "by_reason": stats.get("by_reason") if stats else None,
            # Per service and family, as the interceptor last judged it (see health.py).
            "health": stats.get("proxies") if stats else None,
        },
        "kernel_queue": None if bound is None else {
            "waiting": bound.waiting, "queue_dropped": bound.queue_dropped,
            "user_dropped": bound.user_dropped},
        "proxies": proxies,
        # [metrics]: what the exporter serves, collected here the way it collects it.
        "metrics": metrics_status(load_config(path)),
    }


def health_lines(health: list[dict[str, Any]], now: float) -> list[str]:
    """'health smtp ipv4 (port 10025): ...' per proxy entry of the stats file."""
    lines = []
    for entry in health:
        since = entry.get("since")
        age = f" for {max(0, round(now - since))} s" if isinstance(since, int | float) else ""
        head = f"health {entry.get('service')} ipv{entry.get('family')} (port {entry.get('port')})"
        if entry.get("accepting"):
            lines.append(f"{head}: healthy{age}")
        else:
            lines.append(f"{head}: UNHEALTHY{age}: {entry.get('reason', entry.get('state'))}"
                         + (f"; {entry['action']}" if entry.get("action") else ""))
    return lines


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(args: argparse.Namespace) -> int:
    try:
        status = gather_status(args.config)
    except ConfigError as exc:
        return _config_problems(exc)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    inter = status["interceptor"]
    if not inter["enabled"]:
        state = "disabled in the config"
    elif inter["queue_bound"]:
        state = f"running, bound to NFQUEUE {inter['queue']}"
    else:
        from interceptor.companion import unbound_effect

        state = (f"NOT RUNNING: nothing bound to NFQUEUE {inter['queue']}, "
                 + unbound_effect(inter["fail"] == "open").replace(" until it returns", ""))
    print(f"interceptor: {state}")
    if inter["counters"]:
        counters = "  ".join(f"{k}={v}" for k, v in inter["counters"].items())
        print(f"  counters ({inter['stats_age']} s old): {counters}")
    if inter["queue_bound"]:
        for line in health_lines(inter["health"] or [], time.time()):
            print(f"  {line}")
    queue = status["kernel_queue"]
    if queue:
        print(f"  kernel queue: {queue['waiting']} waiting, {queue['queue_dropped']} dropped "
              f"(queue full), {queue['user_dropped']} dropped (socket buffer)")
    for proxy in status["proxies"]:
        listening = "listening" if proxy["listening"] else "NOT LISTENING"
        print(f"proxy {proxy['service']} ipv{proxy['family']} port {proxy['port']}: {listening}"
              + (f", {proxy['accept_queue']} waiting to be accepted"
                 if proxy["accept_queue"] else ""))
    from proxies.metrics.status import metrics_lines

    for line in metrics_lines(status["metrics"]):
        print(line)
    return 0
