"""aiosmtpd's own SMTP class as a front end (`[smtp] frontend = "aiosmtpd"`), through its
public API only: the reference our front end (`proxies.smtp.frontend`) is tested against.

The same policy handler runs under both (`proxies.smtp.handler`). What this one lacks, on
purpose, is everything we built because aiosmtpd does not do it: replies leave line by line,
aiosmtpd's own replies carry no enhanced status codes (so ENHANCEDSTATUSCODES is not offered),
an idle client is closed without a 421, and its limits are its own. It is meant for comparing
transcripts and for trying a suspected front-end bug, not for a public MX.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from aiosmtpd.smtp import SMTP

from proxies import logs
from proxies.config import SmtpConfig
from proxies.smtp.frontend import Gate, Listening
from proxies.smtp.handler import GatewayHandler, plain_ip


class _GatedSMTP(SMTP):
    """aiosmtpd's protocol with our connection limits, through asyncio.Protocol's methods."""

    def __init__(self, handler: GatewayHandler, gate: Gate, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.gate = gate
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client is None:  # a second call comes after STARTTLS
            client = plain_ip(transport.get_extra_info("peername")[0])
            if not self.gate.admit(client):
                logs.warning("smtp_connection_refused", client=client,
                             reason="connection limit")
                # uvloop's transports do not derive from asyncio's: no isinstance check.
                cast(asyncio.WriteTransport, transport).write(
                    b"421 Too many connections, try again later\r\n")
                transport.close()
                return
            self._client = client
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._client is not None:
            self.gate.release(self._client)
            self._client = None
            super().connection_lost(error)


class AiosmtpdFrontEnd(Listening):
    """Makes one aiosmtpd SMTP per accepted connection."""

    def __init__(self, config: SmtpConfig, handler: GatewayHandler,
                 tls_context: ssl.SSLContext | None, gate: Gate) -> None:
        super().__init__(config, tls_context, gate)
        self.handler = handler

    def protocol(self) -> SMTP:
        return _GatedSMTP(self.handler, self.gate, hostname=self.config.hostname,
                          ident="ESMTP mailgate", data_size_limit=self.config.max_message_size,
                          enable_SMTPUTF8=True, decode_data=False, tls_context=self.tls_context,
                          timeout=self.config.command_timeout)
