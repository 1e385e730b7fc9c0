"""structlog configuration: JSON lines by default, a redaction processor that always runs last.

Configured once, by the CLI. Request context (``request_id``, ``connector``) is bound with
contextvars so every line of a request carries it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO, TextIO

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


#: Values that cannot hold a secret (under a secret-looking key they are masked all the same).
_SCALARS = frozenset({int, float, bool})
#: key -> is it a secret-looking key; log keys are few and fixed, so this stays small.
_key_is_secret: dict[str, bool] = {}


def _secret_key(key: str) -> bool:
    secret = _key_is_secret.get(key)
    if secret is None:
        secret = key.lower() in _SECRET_KEYS
        if len(_key_is_secret) < 4096:
            _key_is_secret[key] = secret
    return secret


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
        if value is None:
            continue
        if _secret_key(key):
            event[key] = MASK
        elif type(value) is str:
            event[key] = scrub(value)
        elif type(value) not in _SCALARS:
            event[key] = _redact_value(value)
    return event


def _scrub_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """A last pass over the rendered line: tracebacks are rendered after `redact` ran."""
    if isinstance(rendered, bytes):
        return scrub(rendered.decode("utf-8", "replace")).encode()
    if isinstance(rendered, str):
        return scrub(rendered)
    return rendered


class _UtcTimestamp:
    """``timestamp``: what ``TimeStamper(fmt="iso", utc=True)`` writes, e.g.
    ``2026-01-02T03:04:05.123456Z``, with the date and time formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        second, nanos = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        micros = nanos // 1000
        # datetime.isoformat() leaves the fraction out when it is zero.
        event["timestamp"] = f"{self._prefix}.{micros:06d}Z" if micros else f"{self._prefix}Z"
        return event


def _dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


class LineWriter:
    """structlog's ``BytesLogger``, with the lines of one event-loop iteration written together.

    The proxy's access line made one ``write`` system call per request, about a tenth of its
    CPU time (bench/RESULTS.md). In a running event loop, a line is appended to a buffer
    that a callback scheduled for the loop's next iteration writes out, with everything
    logged in between: a line reaches the stream microseconds later, in the same order.
    Outside a loop (start-up, shutdown, other threads) lines are written at once, after
    whatever is pending, and whatever is pending at exit is written by ``atexit``.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        #: The loop that will write what is pending (None: no write is scheduled).
        self._scheduled: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(message + b"\n")
            if loop is None:
                self._write()
            elif self._scheduled is not loop or loop.is_closed():
                self._scheduled = loop
                loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            self._scheduled = None
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError):
            pass  # stdout closed or gone: nothing left to tell

    def __repr__(self) -> str:
        return f"<LineWriter(file={self._file!r})>"


#: (processors, logger, a copy of them, the ones a line without exc_info or stack_info
#: needs) as configure_logging set them up, while info lines are emitted.
_direct: tuple[list[Any], Any, list[Any], list[Any]] | None = None


def info_line(fallback: Any, event: str, fields: dict[str, Any]) -> None:
    """Emit an info line through the configured processors, as ``fallback.info(event,
    **fields)`` would, but without structlog's per-call wrapper layers (a third of the cost
    of the proxy's access line; bench/RESULTS.md). ``fields`` is consumed.

    When structlog was configured by anyone else since (``capture_logs`` in a test, say),
    or not by :func:`configure_logging` at all, the line goes through ``fallback``.
    """
    direct = _direct
    # structlog's public view of its configuration (0.7 µs; its private _CONFIG saved that).
    if direct is None or structlog.get_config()["processors"] is not direct[0]:
        fallback.info(event, **fields)
        return
    processors, logger, copy, plain = direct
    if "exc_info" not in fields and "stack_info" not in fields:
        if processors == copy:  # not changed in place since (capture_logs does that)
            # Without them the traceback and stack renderers do nothing, and every value was
            # scrubbed by ``redact`` before rendering: the last pass over the line finds
            # nothing.
            processors = plain
        elif processors[-1] is _scrub_rendered:
            processors = processors[:-1]
    fields["event"] = event
    line: Any = fields
    try:
        for processor in processors:
            line = processor(logger, "info", line)
    except structlog.DropEvent:
        return
    logger.info(line)  # the renderers end every chain in str or bytes


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger) once, for the whole process."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _UtcTimestamp(),
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
            writer = LineWriter(buffer)
            factory = lambda *args: writer  # noqa: E731
            serializer: Any = _dumps
        else:  # a text-only stream (tests)
            factory = structlog.PrintLoggerFactory(stream)
            serializer = lambda obj, default=None: orjson.dumps(obj, default=default).decode()  # noqa: E731
        tail[2] = structlog.processors.JSONRenderer(serializer=serializer)
    processors = [*shared, *tail]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    global _direct
    # structlog keeps the list it was given; info_line checks that it still is the one.
    configured = structlog.get_config()["processors"]
    plain = [
        p
        for p in configured
        if p is not _scrub_rendered
        and not isinstance(
            p, structlog.processors.ExceptionRenderer | structlog.processors.StackInfoRenderer
        )
    ]
    _direct = (configured, factory(), list(configured), plain) if numeric <= logging.INFO else None
    # Libraries that log through the stdlib (aiohttp, asyncio) are scrubbed as well.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
