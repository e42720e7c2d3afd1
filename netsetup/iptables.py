"""Our chains in the mangle table, read and written with python-iptables (legacy xtables).

Kernel glue, kept here so the rest of netsetup only sees `XtTable` data:

- python-iptables drives libiptc, i.e. the *legacy* tables (`iptables-legacy-save` shows them;
  Debian's default `iptables` is the nf_tables backend and does not).
- A whole table is committed at once (`autocommit = False`, then `commit()`): the kernel swaps
  the table in one go, so the ruleset is never half-applied.
- One process cannot use the TPROXY extension for IPv4 *and* IPv6: libxtables then prints
  'target "TPROXY" already registered' and exits the whole process (measured, either order).
  So every python-iptables operation that touches a rule runs in a forked child. Importing
  `iptc` loads no extension, so the parent imports it once (0.2 s) and each child starts with
  it loaded (a few ms per operation instead of 0.2 s).
"""

from __future__ import annotations

import ipaddress
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

from netsetup.desired import MAIN_CHAIN, OUR_CHAINS, XtParams, XtRule, XtTable

T = TypeVar("T")


class IptablesError(Exception):
    pass


def read_ours(family: int) -> XtTable | None:
    """Our chains and the PREROUTING jumps to them, as they are in the kernel."""
    return _in_child(_read_ours, family)


def write_ours(family: int, table: XtTable | None) -> None:
    """Make our part of the family's mangle table exactly `table` (None: remove it)."""
    _in_child(_write_ours, family, table)


def _in_child(func: Callable[..., T], *args: Any) -> T:
    """Run `func(*args)` in a forked child and return its result (see the module docstring)."""
    import iptc  # noqa: F401  (loaded once here so that each child starts with it)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_end)
        try:
            outcome: tuple[str, Any] = ("ok", func(*args))
        except BaseException as exc:
            outcome = ("error", f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
        try:
            data = pickle.dumps(outcome)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise IptablesError(f"python-iptables helper died (exit status {status >> 8}); "
                            "libxtables wrote the reason to stderr")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise IptablesError(value)
    return value


# --- runs in the child ---------------------------------------------------------------------


def _mangle(family: int) -> Any:
    import iptc

    kind = iptc.Table if family == 4 else iptc.Table6
    return kind(kind.MANGLE)


def _network_text(value: str | None) -> str | None:
    if value is None:
        return None
    network = ipaddress.ip_network(value, strict=False)
    return None if network.prefixlen == 0 else str(network)


def _params(values: dict[str, list[str]]) -> XtParams:
    return tuple((name, tuple(v)) for name, v in values.items())


def _decode(chain: str, rule: Any) -> XtRule:
    protocol = rule.protocol if rule.protocol not in (None, "ip", "all") else None
    return XtRule(
        chain=chain,
        target=rule.target.name if rule.target else "",
        protocol=protocol,
        in_interface=rule.in_interface,
        source=_network_text(rule.src),
        destination=_network_text(rule.dst),
        matches=tuple((m.name, _params(m.get_all_parameters())) for m in rule.matches),
        target_params=_params(rule.target.get_all_parameters()) if rule.target else (),
    )


def _encode(family: int, spec: XtRule) -> Any:
    import iptc

    rule = iptc.Rule() if family == 4 else iptc.Rule6()
    if spec.protocol:
        rule.protocol = spec.protocol
    if spec.in_interface:
        rule.in_interface = spec.in_interface
    if spec.source:
        rule.src = spec.source
    if spec.destination:
        rule.dst = spec.destination
    for name, params in spec.matches:
        match = rule.create_match(name)
        for key, values in params:
            # Options with several words (`--tcp-flags MASK COMP`, `! --mark M`) go as a list:
            # iptc hands each word to libxtables as its own argument.
            value = " ".join(values) if len(values) < 2 else list(values)
            setattr(match, key.replace("-", "_"), value)
    target = rule.create_target(spec.target)
    for key, values in spec.target_params:
        setattr(target, key.replace("-", "_"), " ".join(values))
    return rule


def _read_ours(family: int) -> XtTable | None:
    import iptc

    table = _mangle(family)
    table.refresh()
    chains = tuple(
        (name, tuple(_decode(name, r) for r in iptc.Chain(table, name).rules))
        for name in OUR_CHAINS if table.is_chain(name)
    )
    jumps = tuple(_decode("PREROUTING", r) for r in iptc.Chain(table, "PREROUTING").rules
                  if r.target is not None and r.target.name in OUR_CHAINS)
    if not chains and not jumps:
        return None
    return XtTable(family, chains, jumps)


def _write_ours(family: int, wanted: XtTable | None) -> None:
    import iptc

    table = _mangle(family)
    table.autocommit = False
    try:
        table.refresh()
        prerouting = iptc.Chain(table, "PREROUTING")
        for rule in list(prerouting.rules):
            if rule.target is not None and rule.target.name in OUR_CHAINS:
                prerouting.delete_rule(rule)
        for name in OUR_CHAINS:
            if table.is_chain(name):
                table.flush_entries(name)
        wanted_names = [name for name, _ in wanted.chains] if wanted else []
        for name in OUR_CHAINS:
            if table.is_chain(name) and name not in wanted_names:
                table.delete_chain(name)
        if wanted is not None:
            for name in wanted_names:
                if not table.is_chain(name):
                    table.create_chain(name)
            for name, rules in wanted.chains:
                chain = iptc.Chain(table, name)
                for spec in rules:
                    chain.append_rule(_encode(family, spec))
            # Jumps go first in PREROUTING: interception must see the packet before any other
            # mangle rule an administrator keeps there can mark or accept it.
            for spec in reversed(wanted.jumps):
                prerouting.insert_rule(_encode(family, spec))
        table.commit()
    finally:
        table.autocommit = True
        table.refresh()


__all__ = ["MAIN_CHAIN", "IptablesError", "read_ours", "write_ours"]
