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
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator

from proxies import logs, sdnotify
from proxies.config import Config
from proxies.filtering import MessageFilter
from proxies.queue import Queue, QueueError
from proxies.scan.filter import build_filter, build_scanner
from proxies.smtp.delivery import DeliveryAgent
from proxies.smtp.server import GatewayHandler, SharedConnectionGate, SmtpFrontEnd
from proxies.tls import TlsSetupError, client_context, ensure_self_signed, server_context
from proxies.transparent import TransparentError, make_listeners

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
        return Queue(smtp.queue_dir, retry_min=smtp.retry_min, retry_max=smtp.retry_max,
                     lifetime=smtp.queue_lifetime, hostname=smtp.hostname)


async def _start_front(front: SmtpFrontEnd, config: Config) -> None:
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


def _stop_event() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


WORKER_READY = b"ready"
WORKER_START_TIMEOUT = 30.0


async def serve(config: Config, message_filter: MessageFilter | None = None,
                notify_fd: int | None = None, acceptors: int = 0) -> int:
    """The master: delivery scheduler, POP3, and the SMTP front end unless `acceptors`
    workers run it; `notify_fd` reads the workers' queue ids and readiness."""
    smtp = config.smtp
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
    agent = DeliveryAgent(smtp, queue, spoof_source=config.network.spoof_source,
                          tls_context=client_context() if smtp.tls else None)
    if message_filter is None:
        message_filter = build_filter(config.scan)
    handler = GatewayHandler(smtp, queue, message_filter, on_queued=agent.wake)
    front = SmtpFrontEnd(smtp, handler, tls_server)
    if not acceptors:
        await _start_front(front, config)
    pop3 = None
    if config.pop3.enabled:
        from proxies.pop3.service import start_pop3

        pop3 = await start_pop3(config, build_scanner(config.scan))

    loop = asyncio.get_running_loop()
    stop = _stop_event()
    workers_ready = _WorkersReady(acceptors)
    if notify_fd is not None:
        loop.add_reader(notify_fd, _pipe_reader(notify_fd, queue, agent.wake, workers_ready))
    if acceptors:
        try:
            await workers_ready.wait(WORKER_START_TIMEOUT)
        except StartupError:
            pid_file.unlink(missing_ok=True)
            raise

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
               queue_dir=str(smtp.queue_dir), tls=smtp.tls, workers=smtp.workers)
    sdnotify.notify("READY=1")
    stopped = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({delivery, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if delivery.done() and delivery.exception() is not None:
        logs.error("delivery_scheduler_crashed", error=repr(delivery.exception()))
    sdnotify.notify("STOPPING=1")
    logs.event("stopping")
    if interceptor is not None:
        await interceptor.stop()
    await front.stop()
    if pop3 is not None:
        await pop3.stop()
    await agent.stop(STOP_GRACE)
    delivery.cancel()
    stopped.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await delivery
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    logs.event("stopped")
    return 0


class _WorkersReady:
    """Counts the acceptor workers that said they listen."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.gone = False
        self._changed = asyncio.Event()

    def ready(self) -> None:
        self.count += 1
        self._changed.set()

    def all_gone(self) -> None:
        self.gone = True
        self._changed.set()

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count < self.expected and not self.gone:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            if loop.time() >= deadline:
                break
        if self.count < self.expected:
            raise StartupError(f"only {self.count} of {self.expected} SMTP acceptor workers "
                               "started (smtp.workers); the log says why")


def _pipe_reader(fd: int, queue: Queue, wake: Callable[[], None],
                 workers_ready: _WorkersReady) -> Callable[[], None]:
    pending = bytearray()

    def read() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:  # every worker is gone
            asyncio.get_running_loop().remove_reader(fd)
            workers_ready.all_gone()
            return
        pending.extend(data)
        *lines, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        queued = False
        for line in lines:
            if line == WORKER_READY:
                workers_ready.ready()
                continue
            queue.notice(line.decode("ascii", "replace"))
            queued = True
        if queued:
            wake()

    return read


async def serve_acceptor(config: Config, notify_fd: int, gate: SharedConnectionGate) -> int:
    """A worker: the SMTP front end only; each queued id goes to the master's pipe."""
    queue = _open_queue(config)

    def tell_master(queue_id: str) -> None:
        # One short write per id: atomic on a pipe (under PIPE_BUF), never interleaved.
        with contextlib.suppress(OSError):
            os.write(notify_fd, queue_id.encode() + b"\n")

    handler = GatewayHandler(config.smtp, queue, build_filter(config.scan),
                             on_queued=tell_master)
    front = SmtpFrontEnd(config.smtp, handler, _server_tls(config), gate)
    await _start_front(front, config)
    stop = _stop_event()
    tell_master(WORKER_READY.decode())
    await stop.wait()
    await front.stop()
    return 0


def _start_workers(config: Config, count: int) -> tuple[list[int], int]:
    """Fork `count` acceptor processes; return their pids and the pipe's read end."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    pids = []
    # The connection limits hold over all the workers together.
    gate = SharedConnectionGate(config.smtp.max_connections,
                                config.smtp.max_connections_per_client)
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            # Die with the master, whatever kills it (kill -9 included).
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            code = 1
            try:
                code = asyncio.run(serve_acceptor(config, write_fd, gate))
            except BaseException as exc:  # a worker must never run the master's cleanup
                logs.error("worker_crashed", exc_info=True, error=repr(exc))
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    os.close(write_fd)
    return pids, read_fd


def run(config: Config) -> int:
    logs.setup(config.log.level, config.log.format == "json")
    try:
        return _run(config)
    except StartupError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1


def _run(config: Config) -> int:
    workers = config.smtp.workers
    if workers <= 1:
        return asyncio.run(serve(config))
    # The queue directory and the self-signed certificate are made once, before the workers
    # would race for them.
    _open_queue(config).close()
    _server_tls(config)
    # SO_REUSEPORT would let a second mailgate share the port unnoticed; a plain bind first
    # fails if anything (another instance included) holds it.
    with _starting(f"cannot listen on port {config.smtp.listen_port} (smtp.listen)"):
        families = [socket.AF_INET, socket.AF_INET6] if config.network.ipv6 \
            else [socket.AF_INET]
        for sock in make_listeners(config.smtp.listen_port, families, transparent=True,
                                   reuse_port=False):
            sock.close()
    pids, read_fd = _start_workers(config, workers)
    try:
        return asyncio.run(serve(config, notify_fd=read_fd, acceptors=workers))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
