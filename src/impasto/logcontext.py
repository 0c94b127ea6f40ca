"""Structured logs: every record carries the task UUID being handled (a context variable set
where a task enters: the dispatcher, the worker, the engine's outcome sink), and can be written
as one JSON object per line for log collectors (`IMPASTO_LOG_FORMAT=json`). Secrets in URLs
(webhook tokens, presigned signatures) and line breaks that could forge a line are kept out."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime

from impasto.delivery.redact import redact_urls_in

current_task: ContextVar[str | None] = ContextVar("impasto_task_uuid", default=None)


class TaskContextFilter(logging.Filter):
    """Adds `task_uuid` to every record (`-` outside a task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.task_uuid = current_task.get() or "-"
        return True


class RedactingFilter(logging.Filter):
    """Redacts the query strings of URLs in records of the HTTP client libraries (httpx logs
    every request with its full URL) and escapes CR/LF in every message."""

    def __init__(self, url_loggers: Sequence[str] = ("httpx", "httpcore")) -> None:
        super().__init__()
        self._url_loggers = tuple(url_loggers)

    def _logs_urls(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self._url_loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a broken format string: logging reports that itself
        cleaned = redact_urls_in(message) if self._logs_urls(record.name) else message
        cleaned = cleaned.replace("\r", "\\r").replace("\n", "\\n")
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, task, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "task": getattr(record, "task_uuid", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for the CLI: text for a terminal, JSON for collectors."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskContextFilter())
    # On the handler rather than on loggers: records of every logger pass through it.
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(task_uuid)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
