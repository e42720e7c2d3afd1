"""The quarantine: durable store, list/show/delete, retention, release through a queue, CLI."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import pytest

from proxies.cli import main
from proxies.quarantine import NoSuchEntry, Quarantine
from proxies.queue import Queue
from proxies.scan.api import ScanResult
from tests.unit.scan_messages import plain

VIRUS = ScanResult("virus", virus="Eicar-Test-Signature.UNOFFICIAL", scanners=("clamd",),
                   output=("clamd: stream: Eicar-Test-Signature.UNOFFICIAL FOUND",))
MESSAGE = plain(subject="quarantined")


def store(quarantine: Quarantine, **changes: object) -> str:
    fields: dict[str, object] = dict(
        sender="alice@sender.example", recipients=("bob@example.com", "carol@example.com"),
        content=MESSAGE, result=VIRUS, client_address="192.0.2.10", client_port=4242,
        helo="sender.example", original_destination=("198.51.100.25", 25))
    fields.update(changes)
    return quarantine.store(**fields)  # type: ignore[arg-type]


def test_store_and_read_back(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    entry_id = store(quarantine)
    assert oct((tmp_path / "q").stat().st_mode & 0o777) == "0o700"
    assert quarantine.content(entry_id) == MESSAGE
    entry = quarantine.entry(entry_id)
    assert entry.result == VIRUS and entry.reason == "virus" and entry.source == "smtp"
    assert entry.recipients == ("bob@example.com", "carol@example.com")
    assert entry.original_destination == ("198.51.100.25", 25)
    assert entry.size == len(MESSAGE)
    assert [e.id for e in quarantine.list()] == [entry_id]
    assert list((tmp_path / "q" / "tmp").iterdir()) == []


def test_the_pop3_proxy_can_store_too(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    entry_id = quarantine.store(sender="", recipients=["user"], content=MESSAGE,
                                result=ScanResult("spam", score=9.0), source="pop3",
                                extra={"server": "198.51.100.25:110"})
    entry = quarantine.entry(entry_id)
    assert entry.source == "pop3" and entry.extra == {"server": "198.51.100.25:110"}


def test_delete_and_unknown_ids(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    entry_id = store(quarantine)
    assert quarantine.delete(entry_id)
    assert not quarantine.delete(entry_id)
    with pytest.raises(NoSuchEntry):
        quarantine.entry(entry_id)
    with pytest.raises(NoSuchEntry):
        quarantine.entry("../../etc/passwd")


def test_retention_purges_old_entries_and_debris(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    quarantine = Quarantine(tmp_path / "q", retention=86400, clock=lambda: now[0])
    old = store(quarantine)
    now[0] += 3600
    young = store(quarantine)
    debris = tmp_path / "q" / "20200101-000000-00000000.eml"
    debris.write_bytes(b"half")
    os.utime(debris, (0, 0))
    now[0] += 86400 - 1800
    assert [e.id for e in quarantine.list()] == [young]
    assert not debris.exists()
    with pytest.raises(NoSuchEntry):
        quarantine.entry(old)


def broken_quarantine(directory: Path) -> Quarantine:
    """A quarantine every write to fails, even as root (who writes into a read-only directory
    regardless): its tmp/ is a plain file, so nothing can be created in it."""
    quarantine = Quarantine(directory)
    (directory / "tmp").rmdir()
    (directory / "tmp").write_bytes(b"")
    return quarantine


def test_a_failed_write_raises_and_keeps_nothing(tmp_path: Path) -> None:
    quarantine = broken_quarantine(tmp_path / "q")
    with pytest.raises(OSError):
        store(quarantine)
    assert quarantine.list() == [] and list((tmp_path / "q").glob("*.eml")) == []


def test_a_failed_fsync_leaves_no_half_entry(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up between the message and its .json: neither stays behind."""
    quarantine = Quarantine(tmp_path / "q")
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        store(quarantine)
    assert len(calls) == 2
    assert [p.name for p in (tmp_path / "q").rglob("*") if p.is_file()] == []


def test_release_queues_for_the_original_recipients(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path / "q")
    entry_id = store(quarantine)

    async def release() -> str:
        queue = Queue(tmp_path / "queue", hostname="gw.example")
        try:
            return await quarantine.release(entry_id, queue)
        finally:
            queue.close()

    queue_id = asyncio.run(release())
    entry, content = Queue(tmp_path / "queue").show(queue_id)
    assert content == MESSAGE
    assert entry.envelope.recipients == ("bob@example.com", "carol@example.com")
    assert entry.envelope.original_destination == ("198.51.100.25", 25)
    assert entry.sender == "alice@sender.example"
    assert quarantine.list() == []


def test_cli_list_show_release_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    quarantine = Quarantine(tmp_path / "q")
    first, second = store(quarantine), store(quarantine, sender="eve@sender.example")
    Queue(tmp_path / "queue")
    where = ["--dir", str(tmp_path / "q")]
    assert main(["quarantine", "list", *where]) == 0
    out = capsys.readouterr().out
    assert first in out and "virus Eicar-Test-Signature.UNOFFICIAL" in out
    assert main(["quarantine", "list", "--json", *where]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [first, second]
    assert main(["quarantine", "show", first, *where]) == 0
    out = capsys.readouterr().out
    assert "clamd: stream: Eicar-Test-Signature.UNOFFICIAL FOUND" in out
    assert "Subject: quarantined" in out
    assert main(["quarantine", "release", first, *where, "--json",
                 "--queue-dir", str(tmp_path / "queue")]) == 0
    released = json.loads(capsys.readouterr().out)
    assert released["id"] == first and released["daemon_pid"] is None
    assert Queue(tmp_path / "queue").entry(released["queue_id"]).sender == "alice@sender.example"
    assert main(["quarantine", "delete", second, "nonesuch", *where]) == 1
    captured = capsys.readouterr()
    assert f"deleted {second}" in captured.out and "nonesuch: no such entry" in captured.err
    assert main(["quarantine", "list", *where]) == 0
    assert "Quarantine is empty" in capsys.readouterr().out


def test_cli_reads_the_config_file_and_reports_user_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[quarantine]\ndir = "{tmp_path / "q"}"\n')
    assert main(["quarantine", "list", "--config", str(config)]) == 1
    assert "no quarantine at" in capsys.readouterr().err
    store(Quarantine(tmp_path / "q"))
    assert main(["quarantine", "list", "--config", str(config)]) == 0
    assert main(["quarantine", "show", "20990101-000000-deadbeef", "--config",
                 str(config)]) == 1
    assert "no entry 20990101-000000-deadbeef" in capsys.readouterr().err
