"""Structured logging to stderr: ``logger.info("msg", extra={"fields": {...}})``.

Text lines read ``TIME LEVEL logger: message key=value ...``; JSON lines carry
the same keys. Callers pass identifiers, never secrets; as a last line of
defence (a traceback quoting a header, say) anything shaped like an API key is
redacted to its key id before a line is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from .auth.model import redact


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("x", extra=fields(a=1))`` reads better than the nested dict."""
    return {"fields": values}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# Attributes every LogRecord has; anything else came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "fields", "taskName"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """``extra={"fields": {...}}`` and plain ``extra={...}`` keys alike."""
    values = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    values.update(getattr(record, "fields", None) or {})
    return values


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' ="\n')) else text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = record_fields(record)
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in extra.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(record_fields(record))
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(body, default=str))


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would duplicate our request metrics line by line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aioquic logs every handshake step at INFO; our own lines say what matters.
    logging.getLogger("quic").setLevel(logging.WARNING)


__all__ = ["JsonFormatter", "TextFormatter", "fields", "record_fields", "setup_logging"]
