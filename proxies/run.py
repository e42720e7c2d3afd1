"""`mailgate run`: the proxies in the foreground, systemd style.

Logs go to stderr; SIGTERM stops taking connections, lets sessions and delivery attempts
under way finish for a grace period, and exits; readiness is reported with sd_notify. SIGUSR1
(sent by `mailgate queue flush/release`) makes the scheduler look at the queue again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from proxies import logs, sdnotify
from proxies.config import Config
from proxies.filtering import MessageFilter
from proxies.queue import Queue
from proxies.scan.filter import build_filter, build_scanner
from proxies.smtp.delivery import DeliveryAgent
from proxies.smtp.server import GatewayHandler, SmtpFrontEnd
from proxies.tls import client_context, ensure_self_signed, server_context
from proxies.transparent import make_listeners

STOP_GRACE = 10.0


def smtp_listeners(config: Config) -> list[socket.socket]:
    families = [socket.AF_INET, socket.AF_INET6] if config.network.ipv6 else [socket.AF_INET]
    return make_listeners(config.smtp.listen_port, families, transparent=True,
                          reuse_port=config.smtp.workers > 1)


async def serve(config: Config, message_filter: MessageFilter | None = None) -> int:
    smtp = config.smtp
    smtp.queue_dir.mkdir(parents=True, exist_ok=True)
    queue = Queue(smtp.queue_dir, retry_min=smtp.retry_min, retry_max=smtp.retry_max,
                  lifetime=smtp.queue_lifetime, hostname=smtp.hostname)
    report = queue.recover()
    logs.event("queue_recovered", queue_dir=str(smtp.queue_dir), **report.as_fields())
    pid_file = smtp.queue_dir / "master.pid"
    pid_file.write_text(f"{os.getpid()}\n")

    tls_server = None
    if smtp.tls:
        cert, key = (smtp.tls_cert, smtp.tls_key) if smtp.tls_cert and smtp.tls_key else \
            ensure_self_signed(smtp.queue_dir / "tls", smtp.hostname)
        tls_server = server_context(cert, key)
    else:
        logs.warning("smtp_tls_disabled", reason="smtp.tls = false in the config: STARTTLS is "
                     "neither offered to clients nor used towards servers")
    agent = DeliveryAgent(smtp, queue, spoof_source=config.network.spoof_source,
                          tls_context=client_context() if smtp.tls else None)
    if message_filter is None:
        message_filter = build_filter(config.scan)
    handler = GatewayHandler(smtp, queue, message_filter, on_queued=agent.wake)
    front = SmtpFrontEnd(smtp, handler, tls_server)
    await front.start(smtp_listeners(config))
    pop3 = None
    if config.pop3.enabled:
        from proxies.pop3.service import start_pop3

        pop3 = await start_pop3(config, build_scanner(config.scan))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def rescan() -> None:
        queue.rescan()
        agent.wake()

    loop.add_signal_handler(signal.SIGUSR1, rescan)
    delivery = asyncio.create_task(agent.run(), name="delivery-scheduler")
    logs.event("ready", smtp_port=smtp.listen_port, hostname=smtp.hostname,
               queue_dir=str(smtp.queue_dir), tls=smtp.tls)
    sdnotify.notify("READY=1")
    stopped = asyncio.create_task(stop.wait(), name="stop-signal")
    await asyncio.wait({delivery, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if delivery.done() and delivery.exception() is not None:
        logs.error("delivery_scheduler_crashed", error=repr(delivery.exception()))
    sdnotify.notify("STOPPING=1")
    logs.event("stopping")
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


def run(config: Config) -> int:
    logs.setup(config.log.level, config.log.format == "json")
    return asyncio.run(serve(config))
