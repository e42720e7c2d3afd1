"""`mailgate queue ...` through main(argv): output, --json, exit codes and messages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxies.queue import DeliveryResult, Envelope, Queue
from proxies.queue.cli import main
from proxies.queue.store import PID_FILE, poke_master

CONTENT = b"Subject: hello\r\n\r\n" + b"x" * 2000 + b"\r\n"


def fill(directory: Path) -> tuple[Queue, list[str]]:
    queue = Queue(directory, hostname="gw.example.net")

    async def go() -> list[str]:
        return [await queue.accept(Envelope(sender=s, recipients=r), CONTENT) for s, r in (
            ("alice@example.com", ("bob@example.org", "carol@example.org")),
            ("", ("dave@example.org",)))]

    ids = asyncio.run(go())
    queue.claim(ids[0])
    queue.record_attempt(ids[0], {"bob@example.org": DeliveryResult(250, "2.0.0 ok"),
                                  "carol@example.org": DeliveryResult(451, "4.2.0 full")})
    return queue, ids


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["queue", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _queue, ids = fill(tmp_path)
    code, out, _err = run(capsys, "list", "--json", "--queue-dir", str(tmp_path))
    assert code == 0
    entries = json.loads(out)
    assert [e["queue_id"] for e in entries] == ids
    first = entries[0]
    assert first["status"] == "deferred" and first["size"] == len(CONTENT)
    assert first["sender"] == "alice@example.com" and first["attempts"] == 1
    assert first["last_error"] == "451 4.2.0 full"
    assert {r["address"]: r["status"] for r in first["recipients"]} == {
        "bob@example.org": "delivered", "carol@example.org": "deferred"}
    assert entries[1]["sender"] == "" and entries[1]["status"] == "incoming"

    code, out, _err = run(capsys, "list", "--queue-dir", str(tmp_path))
    assert code == 0
    assert ids[0] in out and "(451 4.2.0 full)" in out and "MAILER-DAEMON" in out
    assert "carol@example.org" in out and "bob@example.org" not in out  # delivered: done
    assert out.rstrip().endswith("-- 4 Kbytes in 2 Requests.")


def test_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Queue(tmp_path, hostname="gw")
    assert run(capsys, "list", "--queue-dir", str(tmp_path))[1] == "Mail queue is empty\n"
    assert json.loads(run(capsys, "list", "--json", "--queue-dir", str(tmp_path))[1]) == []


def test_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _queue, ids = fill(tmp_path)
    code, out, _err = run(capsys, "show", ids[0], "--queue-dir", str(tmp_path))
    assert code == 0 and "sender:       <alice@example.com>" in out
    assert "<carol@example.org> deferred  451 4.2.0 full" in out
    assert out.endswith(CONTENT.replace(b"\r\n", b"\n").decode())
    code, out, _err = run(capsys, "show", ids[1], "--json", "--queue-dir", str(tmp_path))
    data = json.loads(out)
    assert data["queue_id"] == ids[1] and data["content"] == CONTENT.decode()


def test_unknown_ids_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path)
    for verb in ("show", "hold", "release", "delete"):
        code, _out, err = run(capsys, verb, "0000000000000000DEAD0", "--queue-dir",
                              str(tmp_path))
        assert code == 1, verb
        assert err.startswith(("mailgate queue: 0000000000000000DEAD0",
                               "mailgate queue: no message 0000000000000000DEAD0")), err
        assert "Traceback" not in err
    code, _out, err = run(capsys, "delete", "--queue-dir", str(tmp_path))
    assert code == 1 and "--all" in err


def test_hold_release_flush_delete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue, ids = fill(tmp_path)
    where = ("--queue-dir", str(tmp_path))
    assert run(capsys, "hold", ids[1], *where)[0] == 0
    assert queue.entry(ids[1]).held
    code, out, _err = run(capsys, "release", ids[1], *where)
    assert code == 0 and "released" in out and "not running" in out
    code, out, _err = run(capsys, "flush", *where)
    assert code == 0 and out.startswith("2 deferred message(s) due now")
    queue.rescan()
    assert queue.due() == ids
    assert run(capsys, "delete", ids[0], *where)[0] == 0
    code, out, _err = run(capsys, "delete", "--all", *where)
    assert code == 0 and out == "deleted 1 message(s)\n" and queue.list() == []


def test_queue_dir_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path / "spool")
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[smtp]\nqueue_dir = "{tmp_path / "spool"}"\n')
    code, out, _err = run(capsys, "list", "--json", "--config", str(config))
    assert code == 0 and len(json.loads(out)) == 2
    code, _out, err = run(capsys, "list", "--config", str(tmp_path / "missing.toml"))
    assert code == 1 and err.startswith("mailgate queue: the config file has problems")
    assert f"{tmp_path / 'missing.toml'}: -: no such file" in err
    code, _out, err = run(capsys, "list", "--queue-dir", str(tmp_path / "nowhere"))
    assert code == 1 and "no queue at" in err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["queue", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("list", "show", "flush", "delete", "hold", "release"))
    assert "examples:" in out


def test_poke_master_signals_only_a_live_daemon(tmp_path: Path) -> None:
    assert poke_master(tmp_path) is None  # no pid file
    (tmp_path / PID_FILE).write_text("999999999\n")
    assert poke_master(tmp_path) is None  # stale pid
    # A stand-in daemon that says "proxies" in its command line and counts SIGUSR1s. The
    # handler writes with os.write: a print() there can land inside the print of 'ready' the
    # parent already read, and a reentrant BufferedWriter raises (seen once, in a fresh root).
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, sys, time  # proxies daemon\n"
         "signal.signal(signal.SIGUSR1, lambda *a: os.write(1, b'rescan\\n'))\n"
         "print('ready', flush=True)\ntime.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "ready\n"
        (tmp_path / PID_FILE).write_text(f"{daemon.pid}\n")
        assert poke_master(tmp_path) == daemon.pid
        assert daemon.stdout.readline() == "rescan\n"
        # A live process that is not mailgate's is left alone (SIGUSR1 would kill it).
        other = subprocess.Popen(["sleep", "30"])
        (tmp_path / PID_FILE).write_text(f"{other.pid}\n")
        time.sleep(0.05)
        assert poke_master(tmp_path) is None
        assert other.poll() is None
        other.send_signal(signal.SIGKILL)
        other.wait()
    finally:
        daemon.kill()
        daemon.wait()
    assert os.path.exists(tmp_path / PID_FILE)
