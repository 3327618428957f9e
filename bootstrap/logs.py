"""Logging: structlog in every process, JSON lines to `<state_dir>/mai.log`, a readable console renderer.

Thespian replaces the root logger inside actor processes and ships records to its logger process (reference
thespian.md §10). So each actor renders with `render_to_log_kwargs` (fields become record attributes, which
pickle), and the logger process formats them: one JSON object per line in the file, `event key=value` on the
console. One event per decision, with the reason as a field. Field values are turned into plain JSON-ready
data in the actor, because the logger process unpickles records through `bootstrap.safe_pickle`, which refuses
arbitrary classes: a record carrying, say, an exception object as a field would be dropped.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from bootstrap.paths import private_file

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime", "actorAddress"}
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        data.update(_fields(record))
        if getattr(record, "actorAddress", None):
            data["actor"] = str(record.actorAddress)
        if record.exc_text or record.exc_info:
            data["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():7s} {record.getMessage()}" + (f"  {extras}" if extras else "")
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class DefaultActorAddress(logging.Filter):
    """Records from processes that are not actors have no actorAddress; give them one so formats never fail."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "actorAddress"):
            record.actorAddress = ""
        return True


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that is created 0600 (the log names models, modes and errors), even after rollover."""

    def _open(self):  # type: ignore[no-untyped-def]
        private_file(self.baseFilename)
        return super()._open()


def append_event(file: Path, level: str, logger: str, event: str, **fields: Any) -> None:
    """Write one JSON line to the log file from a process that is not part of the actor system, before the
    logger process owns the file (a warning at start)."""
    record = logging.LogRecord(logger, LEVELS[level], __file__, 0, event, None, None)
    record.__dict__.update(plain_fields(None, "", fields))
    private_file(file)
    with open(file, "a", encoding="utf-8") as out:
        out.write(JsonLinesFormatter().format(record) + "\n")


def log_defs(level: str, log_file: Path | None, console: bool, console_format: str = "pretty") -> dict:
    """The `logDefs` dict Thespian's logger process applies with dictConfig."""
    handlers: dict[str, dict] = {}
    if log_file is not None:
        handlers["file"] = {
            "()": PrivateRotatingFileHandler,
            "filename": str(log_file),
            "maxBytes": 20 * 1024 * 1024,
            "backupCount": 3,
            "formatter": "json",
            "filters": ["actor"],
            "level": LEVELS[level],
        }
    if console:
        handlers["console"] = {
            "class": "logging.StreamHandler",
            "formatter": "json" if console_format == "json" else "console",
            "filters": ["actor"],
            "level": LEVELS[level],
        }
    if not handlers:
        handlers["null"] = {"class": "logging.NullHandler"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonLinesFormatter}, "console": {"()": ConsoleFormatter}},
        "filters": {"actor": {"()": DefaultActorAddress}},
        "handlers": handlers,
        "root": {"level": LEVELS[level], "handlers": list(handlers)},
        "loggers": {"thespian": {"level": "WARNING"}, "httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
    }


_STDLIB_KWARGS = ("exc_info", "stack_info", "stacklevel")  # render_to_log_kwargs hands these to logging itself


def _plain(value: Any) -> Any:
    """The value as str/int/float/bool/None, lists and dicts of them; anything else by its `str()`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def plain_fields(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: make every field plain data so the record unpickles in the logger process."""
    return {k: v if k in _STDLIB_KWARGS else _plain(v) for k, v in event_dict.items()}


def configure_structlog(level: str = "info") -> None:
    """Call inside each process (after fork): events become stdlib records with fields as attributes."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "matplotlib", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            plain_fields,
            structlog.stdlib.render_to_log_kwargs,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
