"""Structured logs: one line per event, `key=value` (logfmt) or JSON, always to stderr.

Every line of a message's life carries its queue id (`qid=`), so `grep qid=...` tells its
whole story: connect, accept, each delivery attempt, bounce. systemd's journal keeps stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("mailgate")


class _Formatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps(fields, default=str)
        return " ".join(f"{key}={_logfmt(value)}" for key, value in fields.items())


def _logfmt(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text)


def setup(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    _LOGGER.setLevel(level.upper())
    # aiosmtpd logs every command at INFO; its own lines would double ours.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def warning(name: str, **fields: Any) -> None:
    event(name, logging.WARNING, **fields)


def error(name: str, exc_info: bool = False, **fields: Any) -> None:
    event(name, logging.ERROR, exc_info=exc_info, **fields)


def debug(name: str, **fields: Any) -> None:
    event(name, logging.DEBUG, **fields)
