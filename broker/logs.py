"""structlog configuration: JSON lines by default, a redaction processor that always runs last.

Configured once, by the CLI. Request context (``request_id``, ``connector``) is bound with
contextvars so every line of a request carries it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from .secrets import MASK, Secret, scrub

#: Keys whose values are secrets whatever they hold.
_SECRET_KEYS = frozenset(
    {
        "password",
        "client_secret",
        "access_token",
        "refresh_token",
        "authorization",
        "apikey",
        "token",
        "sask",
        "cs",
        "encryption_key",
        "admin_token",
    }
)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, dict):
        return {
            k: MASK if str(k).lower() in _SECRET_KEYS else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask every registered secret and every value under a secret-looking key."""
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS and value is not None:
            event[key] = MASK
        else:
            event[key] = _redact_value(value)
    return event


def _scrub_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """A last pass over the rendered line: tracebacks are rendered after `redact` ran."""
    if isinstance(rendered, bytes):
        return scrub(rendered.decode("utf-8", "replace")).encode()
    if isinstance(rendered, str):
        return scrub(rendered)
    return rendered


def _dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger) once, for the whole process."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        tail: list[Any] = [
            structlog.processors.StackInfoRenderer(),
            redact,
            renderer,
            _scrub_rendered,
        ]
        factory: Any = structlog.PrintLoggerFactory(stream)
    else:
        tail = [
            structlog.processors.dict_tracebacks,
            redact,
            structlog.processors.JSONRenderer(serializer=_dumps),
            _scrub_rendered,
        ]
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            factory = structlog.BytesLoggerFactory(buffer)
            serializer: Any = _dumps
        else:  # a text-only stream (tests)
            factory = structlog.PrintLoggerFactory(stream)
            serializer = lambda obj, default=None: orjson.dumps(obj, default=default).decode()  # noqa: E731
        tail[2] = structlog.processors.JSONRenderer(serializer=serializer)
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the stdlib (aiohttp, asyncio) are scrubbed as well.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
