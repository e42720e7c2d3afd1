"""`mailgate run`: the proxies in the foreground, systemd style.

Logs go to stderr; SIGTERM stops taking connections, lets sessions and delivery attempts
under way finish for a grace period, and exits; readiness is reported with sd_notify. SIGUSR1
(sent by `mailgate queue flush/release`) makes the scheduler look at the queue again.

With `smtp.workers = N > 1` the SMTP front end runs in N processes, each with its own
SO_REUSEPORT listener behind the one TPROXY rule, so acceptance (aiosmtpd's parsing and the
queue's fsync) uses every core; the kernel spreads connections over them. Only the master
delivers: the workers tell it each queue id they accepted through a pipe, so there is one
scheduler, as in Postfix (many smtpd, one qmgr). The master then accepts nothing itself:
delivery is a full-time job (sharing a process with an acceptor cut the delivery rate by a
third), and the workers say through the same pipe when they listen, before it reports ready.

The master supervises the workers (proxies.process, after Postfix's master(8)): one that dies
is logged (`worker_exited`) and replaced, listening anew, with a backoff; if they keep dying
the master exits 1 and systemd restarts the lot. It also owns the connection counts: each
worker counts in its own slot, which the master clears when it reaps that worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import os
import pickle
import signal
import socket
import sqlite3
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from proxies import configcheck, eventloop, logs, sdnotify
from proxies.config import Config
from proxies.filtering import MessageFilter
from proxies.metrics import exporter as metrics_exporter
from proxies.process import ConnectionSlots, Supervisor
from proxies.queue import Queue, QueueError
from proxies.queue.journal import Record
from proxies.queue.ratelimit import BounceRateLimit
from proxies.scan.filter import build_filter, build_scanner
from proxies.smtp.delivery import DeliveryAgent
from proxies.smtp.frontend import Gate, MailgateFrontEnd
from proxies.smtp.handler import ConnectionGate, GatewayHandler
from proxies.smtp.reference import AiosmtpdFrontEnd
from proxies.smtp.verify import RecipientVerifier
from proxies.tls import TlsSetupError, client_context, ensure_self_signed, server_context
from proxies.transparent import TransparentError, make_listeners, set_egress_mark

if TYPE_CHECKING:
    from proxies.pop3.service import RunningService

STOP_GRACE = 10.0
PR_SET_PDEATHSIG = 1


def smtp_listeners(config: Config) -> list[socket.socket]:
    families = [socket.AF_INET, socket.AF_INET6] if config.network.ipv6 else [socket.AF_INET]
    return make_listeners(config.smtp.listen_port, families, transparent=True,
                          reuse_port=config.smtp.workers > 1)


class StartupError(Exception):
    """What stops the proxies from starting once the config file is read: a queue directory
    that cannot be made, a certificate that will not load, a port already taken. `run` reports
    it as one `mailgate: ...` line and exit status 1, never as a traceback."""


def _reason(exc: OSError) -> str:
    if isinstance(exc, TransparentError):
        return str(exc)  # says what to do about it
    where = f"{exc.filename}: " if exc.filename else ""
    return where + (exc.strerror or str(exc))


@contextlib.contextmanager
def _starting(what: str) -> Iterator[None]:
    """Turn the errors a start-up step can meet into a StartupError about `what`."""
    try:
        yield
    except (TlsSetupError, QueueError) as exc:
        raise StartupError(f"{what}: {exc}") from None
    except OSError as exc:
        raise StartupError(f"{what}: {_reason(exc)}") from None


def _open_queue(config: Config) -> Queue:
    smtp = config.smtp
    with _starting(f"queue directory {smtp.queue_dir} (smtp.queue_dir)"):
        smtp.queue_dir.mkdir(parents=True, exist_ok=True)
        queue = Queue(smtp.queue_dir, retry_min=smtp.retry_min, retry_max=smtp.retry_max,
                      lifetime=smtp.queue_lifetime, hostname=smtp.hostname, use_journal=True)
    queue.bounce_limit = BounceRateLimit.for_queue(smtp)
    return queue


FrontEnd = MailgateFrontEnd | AiosmtpdFrontEnd


def make_front_end(config: Config, handler: GatewayHandler, tls: ssl.SSLContext | None,
                   gate: Gate | None = None) -> FrontEnd:
    """`[smtp] frontend`: ours by default, aiosmtpd's own SMTP class as the reference."""
    smtp = config.smtp
    gate = gate or ConnectionGate(smtp.max_connections, smtp.max_connections_per_client)
    if smtp.frontend == "aiosmtpd":
        return AiosmtpdFrontEnd(smtp, handler, tls, gate)
    return MailgateFrontEnd(smtp, handler, tls, gate)


async def _start_front(front: FrontEnd, config: Config) -> None:
    with _starting(f"cannot listen on port {config.smtp.listen_port} (smtp.listen)"):
        await front.start(smtp_listeners(config))


def _server_tls(config: Config) -> ssl.SSLContext | None:
    smtp = config.smtp
    if not smtp.tls:
        return None
    with _starting("smtp TLS"):
        if smtp.tls_cert and smtp.tls_key:
            return server_context(smtp.tls_cert, smtp.tls_key)
        return server_context(*ensure_self_signed(smtp.queue_dir / "tls", smtp.hostname))


def _verifier(config: Config) -> RecipientVerifier | None:
    """The recipient verifier of a process that answers SMTP clients (its result cache is the
    one file every such process shares, in the queue directory)."""
    if not config.smtp.verify_recipients:
        return None
    what = (f"recipient verification cache in {config.smtp.queue_dir} (smtp.queue_dir; "
            "smtp.verify_recipients = false turns verification off)")
    with _starting(what):
        try:
            return RecipientVerifier.open(
                config.smtp, spoof_source=config.network.spoof_source,
                tls_context=client_context() if config.smtp.tls else None)
        except sqlite3.Error as exc:  # a corrupt or foreign file where the cache should be
            raise StartupError(f"{what}: {exc}") from None


def _stop_event() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


WORKER_START_TIMEOUT = 30.0


async def serve(config: Config, message_filter: MessageFilter | None = None,
                acceptors: int = 0) -> int:
    """The master: delivery scheduler, POP3, and the SMTP front end unless `acceptors`
    workers run it (started here once the queue is recovered, and kept up)."""
    smtp = config.smtp
    # [metrics]: before any worker exists, which counts into the directory made here.
    metrics_dir = metrics_exporter.shared_dir(config)
    with _starting(f"metrics directory {metrics_dir} (metrics.dir)"):
        metrics_exporter.start_master(config)
    queue = _open_queue(config)
    pid_file = smtp.queue_dir / "master.pid"
    with _starting(f"queue directory {smtp.queue_dir} (smtp.queue_dir)"):
        report = queue.recover()
        pid_file.write_text(f"{os.getpid()}\n")
    logs.event("queue_recovered", queue_dir=str(smtp.queue_dir), **report.as_fields())

    tls_server = _server_tls(config)
    if tls_server is None:
        logs.warning("smtp_tls_disabled", reason="smtp.tls = false in the config: STARTTLS is "
                     "neither offered to clients nor used towards servers")
    for warning in configcheck.host_warnings(config):
        logs.warning("clamd_limits", detail=warning)
    agent = DeliveryAgent(smtp, queue, spoof_source=config.network.spoof_source,
                          tls_context=client_context() if smtp.tls else None)
    if message_filter is None:
        message_filter = build_filter(config.scan)
    # With acceptor workers this handler answers nobody: only they verify recipients.
    handler = GatewayHandler(smtp, queue, message_filter, on_queued=agent.wake,
                             verifier=None if acceptors else _verifier(config))
    front = make_front_end(config, handler, tls_server)
    if not acceptors:
        await _start_front(front, config)
    pop3 = None
    if config.pop3.enabled:
        from proxies.pop3.service import start_pop3

        pop3 = await start_pop3(config, build_scanner(config.scan))

    stop = _stop_event()
    workers = None
    if acceptors:
        workers = _Acceptors(config, queue, agent.wake)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, workers.stopping, stop)
    exporter = None
    if config.metrics.enabled:
        exporter = metrics_exporter.Exporter(config)
        with _starting(f"metrics: cannot listen on {config.metrics.listen_text} "
                       "(metrics.listen)"):
            exporter.start()
        logs.event("metrics_listening", listen=config.metrics.listen_text, dir=str(metrics_dir))
    try:
        return await _serve_started(config, queue, agent, front, pop3, stop, workers)
    finally:
        if workers is not None:  # also when something above failed: no worker outlives us
            await workers.stop(2.0)
        if exporter is not None:
            await exporter.stop()
        metrics_exporter.stop_recording()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()


async def _serve_started(config: Config, queue: Queue, agent: DeliveryAgent,
                         front: FrontEnd, pop3: RunningService | None, stop: asyncio.Event,
                         workers: _Acceptors | None) -> int:
    smtp = config.smtp
    loop = asyncio.get_running_loop()
    if workers is not None:
        await workers.start(WORKER_START_TIMEOUT)

    def rescan() -> None:
        queue.rescan()
        agent.wake()

    loop.add_signal_handler(signal.SIGUSR1, rescan)
    delivery = asyncio.create_task(agent.run(), name="delivery-scheduler")
    # [interceptor] enabled: `mailgate intercept` as a supervised child, and a watch on the queue.
    from interceptor.companion import start_companion

    interceptor = start_companion(config.path, config.interceptor.enabled,
                                  config.interceptor.queue)
    logs.event("ready", smtp_port=smtp.listen_port, hostname=smtp.hostname,
               queue_dir=str(smtp.queue_dir), tls=smtp.tls, workers=smtp.workers,
               frontend=smtp.frontend, event_loop=eventloop.name())
    sdnotify.notify("READY=1")
    stopped = asyncio.create_task(stop.wait(), name="stop-signal")
    waiting = {delivery, stopped}
    gave_up = None
    if workers is not None:
        gave_up = asyncio.create_task(workers.supervisor.gave_up.wait(), name="workers-gave-up")
        waiting.add(gave_up)
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if delivery.done() and delivery.exception() is not None:
        logs.error("delivery_scheduler_crashed", error=repr(delivery.exception()))
    if gave_up is not None and gave_up.done():
        code = 1  # systemd's Restart=on-failure starts us again, workers and all
    sdnotify.notify("STOPPING=1")
    logs.event("stopping")
    if workers is not None:
        await workers.stop(STOP_GRACE)  # they stop taking connections first
    if interceptor is not None:
        await interceptor.stop()
    await front.stop()
    if pop3 is not None:
        await pop3.stop()
    await agent.stop(STOP_GRACE)
    for task in (delivery, stopped, gave_up):
        if task is not None:
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await delivery
    logs.event("stopped", exit_code=code)
    return code


# --- SMTP acceptor workers -----------------------------------------------------------------------
#
# Each worker is a fresh interpreter (`python -m proxies.worker`, fork + exec as Postfix's master
# starts smtpd), not a bare fork of the master: the master runs an event loop and delivery
# threads by then, and a fork would copy its sockets (keeping its delivery connections open),
# its loop's signal wake-up pipe and any lock a thread held. A worker gets three descriptors:
# the master's config (pickled in a memfd, so a respawned worker runs the master's config, not
# whatever the file says now), the write end of the queue-id pipe, and the connection counts.

WORKER_READY = "ready"  # "ready SLOT PID": the worker listens


class _SlotGate:
    """The front end's connection gate (proxies.smtp.frontend.Gate) over one worker's slot of
    the master's counts."""

    def __init__(self, counts: ConnectionSlots, slot: int) -> None:
        self.counts = counts
        self.slot = slot

    def admit(self, client: str) -> bool:
        return self.counts.admit(self.slot, client)

    def release(self, client: str) -> None:
        self.counts.release(self.slot, client)


class _Acceptors:
    """The SMTP acceptor workers as the master sees them: supervised (proxies.process), their
    connections counted in one place, their queue ids and readiness read from one pipe."""

    def __init__(self, config: Config, queue: Queue, wake: Callable[[], None]) -> None:
        smtp = config.smtp
        self.config = config
        self.queue = queue
        self.wake = wake
        # The master keeps the write end open: respawned workers get the same pipe.
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.config_fd = os.memfd_create("mailgate-config", os.MFD_CLOEXEC)
        os.write(self.config_fd, pickle.dumps(config))
        self.counts = ConnectionSlots(smtp.workers, smtp.max_connections,
                                      smtp.max_connections_per_client)
        # Inherited by our workers only: every other child is spawned with close_fds.
        for fd in (self.write_fd, self.config_fd, self.counts.fd):
            os.set_inheritable(fd, True)
        self.supervisor = Supervisor("smtp", smtp.workers, self._spawn, on_exit=self._exited)
        self.ready: set[int] = set()  # pids that said they listen
        self.started = False
        self._failed_at_start = False
        self._changed = asyncio.Event()
        self._pending = bytearray()
        self._reading = False
        self._stopped = False

    def _spawn(self, slot: int) -> int:
        argv = [sys.executable, "-m", "proxies.worker", "--slot", str(slot),
                "--master", str(os.getpid()), "--config-fd", str(self.config_fd),
                "--notify-fd", str(self.write_fd), "--connections-fd", str(self.counts.fd)]
        return os.posix_spawn(sys.executable, argv, os.environ)

    def _exited(self, slot: int, pid: int) -> None:
        held = self.counts.held(slot)
        self.counts.reset(slot)  # the dead worker's connections are gone with it
        if held:
            logs.event("worker_connections_released", worker="smtp", slot=slot, pid=pid,
                       connections=held)
        self.ready.discard(pid)
        metrics_exporter.worker_gone(self.config, pid)
        self.queue.writer_gone(pid)  # what it appended to the journal but never told us of
        # It may have linked a message into incoming/ and died before telling us (its client
        # got no 250, but the file is complete): look at the directories, as after a restart.
        self.queue.rescan()
        self.wake()
        if not self.started:
            self._failed_at_start = True
            self._changed.set()

    async def start(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.read_fd, self._read)
        self._reading = True
        self.supervisor.start()
        deadline = loop.time() + timeout
        while len(self.ready) < self.supervisor.count and not self._failed_at_start:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            if loop.time() >= deadline:
                break
        if len(self.ready) < self.supervisor.count:
            raise StartupError(f"only {len(self.ready)} of {self.supervisor.count} SMTP "
                               "acceptor workers started (smtp.workers); the log says why")
        self.started = True

    def _read(self) -> None:
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return
        self._pending.extend(data)
        *lines, partial = bytes(self._pending).split(b"\n")
        self._pending[:] = partial
        queued = False
        for line in lines:
            word, _, fields = line.decode("ascii", "replace").partition(" ")
            if word == WORKER_READY:
                slot, _, pid = fields.partition(" ")
                if int(pid) in self.supervisor.slots:  # not one reaped since it wrote
                    self.ready.add(int(pid))
                    logs.event("worker_ready", worker="smtp", slot=int(slot), pid=int(pid),
                               ready=len(self.ready), workers=self.supervisor.count)
                    self._changed.set()
                continue
            self.queue.notice(word, _journal_record(word, fields))
            queued = True
        if queued:
            self.wake()

    def stopping(self, stop: asyncio.Event) -> None:
        """The master's SIGTERM/SIGINT: exits from now on are expected, then stop."""
        self.supervisor.shutting_down()
        stop.set()

    async def stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.supervisor.stop(grace)
        if self._reading:
            self._read()  # the last ids the workers sent
            asyncio.get_running_loop().remove_reader(self.read_fd)
            self._reading = False


def _journal_record(queue_id: str, fields: str) -> Record | None:
    """The journal record in a worker's line `QUEUE_ID SEGMENT OFFSET LENGTH`; None for a
    bare queue id (a message written as a file of its own)."""
    segment, offset, length = ([*fields.split(), "", "", ""])[:3]
    if not (offset.isdecimal() and length.isdecimal()):
        return None
    return Record(queue_id, segment, int(offset), int(length))


async def serve_acceptor(config: Config, notify_fd: int, gate: Gate,
                         slot: int) -> int:
    """A worker: the SMTP front end only; each queued message goes to the master's pipe."""
    queue = _open_queue(config)
    queue.delivers = False

    def tell_master(line: str) -> None:
        # One short write per line: atomic on a pipe (under PIPE_BUF), never interleaved.
        with contextlib.suppress(OSError):
            os.write(notify_fd, line.encode() + b"\n")

    def durable(record: Record) -> None:
        tell_master(f"{record.queue_id} {record.segment} {record.offset} {record.length}")

    # The queue tells of each message once it is durable (even if its client is gone by
    # then), so the handler's own hook is not needed.
    queue.on_durable = durable
    handler = GatewayHandler(config.smtp, queue, build_filter(config.scan), on_queued=None,
                             verifier=_verifier(config))
    front = make_front_end(config, handler, _server_tls(config), gate)
    await _start_front(front, config)
    stop = _stop_event()
    tell_master(f"{WORKER_READY} {slot} {os.getpid()}")
    await stop.wait()
    await front.stop()
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """`python -m proxies.worker`: what the master starts; not for people."""
    parser = argparse.ArgumentParser(
        prog="mailgate-worker", description="An SMTP acceptor worker of `mailgate run`; "
        "only the master starts these (smtp.workers).")
    for name in ("--slot", "--master", "--config-fd", "--notify-fd", "--connections-fd"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args(argv)
    # Die with the master, whatever kills it (kill -9 included); if it is already gone, the
    # signal would never come.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != args.master:
        return 1
    config: Config = pickle.loads(os.pread(args.config_fd, os.fstat(args.config_fd).st_size, 0))
    os.close(args.config_fd)
    logs.setup(config.log.level, config.log.format == "json")
    set_egress_mark(config.network.egress_mark)  # as run() does: a worker is a new process
    smtp = config.smtp
    counts = ConnectionSlots(smtp.workers, smtp.max_connections,
                             smtp.max_connections_per_client, fd=args.connections_fd)
    try:
        metrics_exporter.start_worker(config)  # [metrics]: into the master's directory
        return eventloop.run(serve_acceptor(config, args.notify_fd,
                                            _SlotGate(counts, args.slot), args.slot))
    except StartupError as exc:
        print(f"mailgate: SMTP worker {args.slot}: {exc}", file=sys.stderr)
    except Exception as exc:
        logs.error("worker_crashed", exc_info=True, slot=args.slot, error=repr(exc))
    finally:
        sys.stderr.flush()
    return 1


def run(config: Config) -> int:
    logs.setup(config.log.level, config.log.format == "json")
    # `kill -USR2 <master pid>`: every thread's stack to stderr (the log), for a master that
    # seems stuck; nothing else changes.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    set_egress_mark(config.network.egress_mark)
    try:
        return _run(config)
    except StartupError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1


def _run(config: Config) -> int:
    workers = config.smtp.workers
    if workers <= 1:
        return eventloop.run(serve(config))
    # The queue directory and the self-signed certificate are made once, before the workers
    # would race for them.
    _open_queue(config).close()
    _server_tls(config)
    verifier = _verifier(config)  # the verification cache's file and tables, likewise
    if verifier is not None:
        verifier.cache.close()
    # SO_REUSEPORT would let a second mailgate share the port unnoticed; a plain bind first
    # fails if anything (another instance included) holds it.
    with _starting(f"cannot listen on port {config.smtp.listen_port} (smtp.listen)"):
        families = [socket.AF_INET, socket.AF_INET6] if config.network.ipv6 \
            else [socket.AF_INET]
        for sock in make_listeners(config.smtp.listen_port, families, transparent=True,
                                   reuse_port=False):
            sock.close()
    return eventloop.run(serve(config, acceptors=workers))
