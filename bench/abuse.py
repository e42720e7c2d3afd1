"""The abuse campaign at length: `mailgate run` attacked in the lab, with figures.

    python -m bench.abuse [--sessions 2000] [--duration 120] [--workers 2] [--json]

The same lab, peers, limits and attacks as tests/lab/test_abuse.py (its CI slice is 300
mutated sessions for 18 s), here as long as asked: --sessions is the number of mutated SMTP
sessions, and every other attack is scaled with it; --duration bounds each attack's time. All
attacks run at once from the sender host (one address each), while probe clients (SMTP and
POP3, from an address of their own) keep sending and fetching real mail; then a flood of the
whole connection limit, then mailgate is stopped and its log read.

Printed: sessions, replies and outcomes per attack; RSS of each mailgate process (master and
workers) before and after, and its peak; the SMTP probe's latency p50/p99 idle and under
attack; the log's level=error lines and its warnings counted by event; and any check that did
not hold (a malformed reply, internal text in a reply, a limit that did not answer, a probe
refused, a traceback or unstructured line in the log). Exit status 0 if everything held,
1 if something did not. Needs root; everything lives in namespaces removed at the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netsetup.lab.abuse import check_log
from netsetup.lab.topology import Lab
from tests.lab.test_abuse import (
    LIMITS,
    Probe,
    attack_plan,
    build,
    check_tallies,
    describe,
    mailgate_pids,
    memory,
    percentiles,
    run_attacks,
    total_flood,
)

CI_SESSIONS = 300  # the mutated sessions of the CI slice, which scale 1.0 means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000,
                        help="mutated SMTP sessions; the other attacks are scaled alike "
                             f"(the CI slice: {CI_SESSIONS})")
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds each attack may run at most (default 120)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of probing before the attack, for the idle latency")
    parser.add_argument("--workers", type=int, default=2, help="smtp.workers (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="the mutations' random seed")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"),
                        help="mailgate's log level (default info)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.workers < 1:
        parser.error("--duration and --workers must be positive")
    if args.sessions < 100:
        # The checks it shares with tests/lab/test_abuse.py expect that many mutated sessions.
        parser.error("--sessions must be at least 100")

    workdir = Path(tempfile.mkdtemp(prefix="mailgate-abuse-"))
    workdir.chmod(0o755)  # Dovecot's and smtp-sink's users must reach their folders
    problems: list[str] = []
    figures: dict[str, Any] = {}
    with Lab("router", name="abb" + secrets.token_hex(2)) as lab:
        env = build(lab, workdir, args.log_level, args.workers)
        gateway = env.gateway
        probe = Probe(lab, env.pop3_probe_message).start()
        try:
            time.sleep(args.idle)
            pids = mailgate_pids(gateway)
            before = {name: memory(pid) for name, pid in pids.items()}
            probe.phase = "attack"
            started = time.monotonic()
            plan = attack_plan(args.sessions / CI_SESSIONS, args.duration, args.seed)
            tallies = run_attacks(lab, plan, timeout=args.duration + 120)
            attack_seconds = time.monotonic() - started
            total = total_flood(lab, probe)
        finally:
            probe.stop()
        after = {name: memory(pid) for name, pid in pids.items()}
        try:
            check_tallies(tallies)
        except AssertionError as exc:
            problems.append(f"an attack met the unexpected: {exc}")
        refused = [p for p in probe.smtp if p[2] is not None and p[0] != "total flood"]
        if refused:
            problems.append(f"{len(refused)} probe messages refused, e.g. {refused[0]}")
        pop3_failed = [p for p in probe.pop3 if p[2] is not None]
        if pop3_failed:
            problems.append(f"{len(pop3_failed)} POP3 probes failed, e.g. {pop3_failed[0]}")
        code, stop_seconds = gateway.stop(timeout=60)
        if code != 0:
            problems.append(f"mailgate exited with status {code}")
        report = check_log(gateway.log())
        if not report.clean:
            problems.append("the log:\n" + report.problems())
        figures = {
            "attack_seconds": round(attack_seconds, 1),
            "attacks": {name: {"sessions": t.sessions, "seconds": round(t.seconds, 1),
                               "replies": dict(t.replies), "outcomes": dict(t.outcomes)}
                        for name, t in tallies.items()},
            "total_flood": {"most_at_once": max(t.peak_open_all for t in total.values()),
                            "refused": sum(t.replies["421 4.7.0"] for t in total.values()),
                            "max_connections": LIMITS["smtp"]["max_connections"]},
            "rss": {name: {"before_mib": before[name]["VmRSS"] >> 20,
                           "after_mib": after[name]["VmRSS"] >> 20,
                           "peak_mib": after[name]["VmHWM"] >> 20} for name in pids},
            "probe": {phase: percentiles(probe.latencies(phase)) for phase in ("idle", "attack")},
            "log": {"lines": report.lines, "error_lines": len(report.errors),
                    "warnings": dict(report.warnings.most_common())},
            "stop_seconds": round(stop_seconds, 1),
            "problems": problems,
        }
    if args.json:
        json.dump(figures, sys.stdout, indent=2)
        print()
    else:
        print(f"attacks ran {figures['attack_seconds']} s")
        for tally in tallies.values():
            print(describe(tally))
        flood_figures = figures["total_flood"]
        print(f"total connection flood: at most {flood_figures['most_at_once']} admitted at "
              f"once, {flood_figures['refused']} refused (max_connections "
              f"{flood_figures['max_connections']})")
        for name, rss in figures["rss"].items():
            print(f"{name:9} RSS {rss['before_mib']} MiB before, {rss['after_mib']} MiB after, "
                  f"peak {rss['peak_mib']} MiB")
        print(f"SMTP probe latency: idle {figures['probe']['idle']}; "
              f"under attack {figures['probe']['attack']}")
        print(f"log: {report.lines} lines, {len(report.errors)} level=error, warnings by event "
              f"{figures['log']['warnings']}")
        print(f"mailgate stopped in {figures['stop_seconds']} s")
        for problem in problems:
            print(f"PROBLEM: {problem}")
        print("everything held" if not problems else f"{len(problems)} problems")
    if problems:
        print(f"bench.abuse: logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
