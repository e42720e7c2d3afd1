"""What `mailgate run` does about the interceptor when `[interceptor] enabled = true`.

It starts `mailgate intercept` as a child process (a crash there cannot take the proxies down,
and the NFQUEUE loop keeps a core of its own), restarts it when it exits (1 s, doubling to
30 s), and once a second checks that *some* program is bound to the queue: when none is, new
connections pass uninspected (`--queue-bypass`, fail = "open") or are held, their SYNs dropped
until it returns (fail = "closed"), so that is logged as a warning, and its return as an event.
The check reads one small /proc file (interceptor/queuestate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

from interceptor import queuestate
from proxies import logs

WATCH_INTERVAL = 1.0
RESTART_MIN, RESTART_MAX = 1.0, 30.0


def unbound_effect(fail_open: bool) -> str:
    """What the kernel does with new connections while no interceptor is bound (netsetup)."""
    if fail_open:
        return "new connections pass uninspected until it returns"
    return "new connections are held (SYNs dropped, clients retry) until it returns"


def _fail_open_from(config_path: Path) -> bool:
    from netsetup.config import load_network_config
    from netsetup.configfile import ConfigError

    try:
        steering = load_network_config(config_path).queue_steering
    except (ConfigError, OSError):
        return True  # the default; only the wording of a log line depends on it
    return steering is None or steering.fail_open


class Companion:
    def __init__(self, config_path: Path, queue: int, start_child: bool = True,
                 fail_open: bool | None = None) -> None:
        self.config_path = config_path
        self.queue = queue
        self.start_child = start_child
        self.fail_open = _fail_open_from(config_path) if fail_open is None else fail_open
        self.child: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="interceptor-companion")

    async def _spawn(self) -> None:
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxies.cli", "intercept", "--config", str(self.config_path),
            "--die-with-parent", str(os.getpid()))
        logs.event("interceptor_started", pid=self.child.pid)

    async def _run(self) -> None:
        bound: bool | None = None
        delay = RESTART_MIN
        restart_at = 0.0
        loop = asyncio.get_running_loop()
        if self.start_child:
            await self._spawn()
        while not self._stopping:
            if self.child is not None and self.child.returncode is not None:
                if restart_at == 0.0:
                    logs.warning("interceptor_exited", status=self.child.returncode,
                                 restart_in=delay)
                    restart_at = loop.time() + delay
                elif loop.time() >= restart_at:
                    await self._spawn()
                    restart_at, delay = 0.0, min(delay * 2, RESTART_MAX)
            now_bound = self.queue in queuestate.read()
            if now_bound != bound:
                if now_bound:
                    logs.event("interceptor_bound", queue=self.queue)
                    delay = RESTART_MIN
                elif bound is not None or not self.start_child:
                    logs.warning("interceptor_gone", queue=self.queue,
                                 effect=unbound_effect(self.fail_open))
                bound = now_bound
            await asyncio.sleep(WATCH_INTERVAL)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.child is not None and self.child.returncode is None:
            self.child.terminate()
            try:
                await asyncio.wait_for(self.child.wait(), 5)
            except TimeoutError:
                self.child.kill()
                await self.child.wait()


def start_companion(config_path: Path, enabled: bool, queue: int,
                    fail_open: bool | None = None) -> Companion | None:
    """None when [interceptor] is not enabled; else a started Companion (inside a loop).
    `fail_open` None: read from the config file."""
    if not enabled:
        return None
    companion = Companion(config_path, queue, fail_open=fail_open)
    companion.start()
    return companion
