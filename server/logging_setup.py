"""Structured, quiet logs: one JSON object per line (or plain text with `--log-format text`), INFO by default, no
per-request access lines unless asked. Lines written while a request is handled carry its `request_id`."""

from __future__ import annotations

import json
import logging
import sys
import time

from server.request_context import RequestIdFilter

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: `ts level logger: message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{_timestamp(record)} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        return f"{line}\n{self.formatException(record.exc_info)}" if record.exc_info else line


def current_format() -> str:
    """The format the root logger writes (the engine process logs the same way as the API process)."""
    handlers = logging.getLogger().handlers
    return "text" if handlers and isinstance(handlers[0].formatter, TextFormatter) else "json"


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the one at configuration: a host program
    (or pytest's output capture) may swap stderr and close the old one while background threads still log."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass  # StreamHandler.__init__ assigns one; we never keep it


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of: {', '.join(LOG_LEVELS)}")
    handler = CurrentStderrHandler()
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
