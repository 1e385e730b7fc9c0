"""Secret values: masked wherever they could be printed, and known to the log redactor.

Every configured secret and every token the broker holds is registered here, so that the
redaction processor in :mod:`broker.logs` can scrub it from any log line, even one that embeds
it by accident (an upstream error body that echoes a token, say).
"""

from __future__ import annotations

import threading
from typing import Any

MASK = "***"
#: Shorter values are too likely to occur by chance to be scrubbed from text.
_MIN_REDACT_LEN = 6
#: Tokens come and go; keep the registry from growing without bound.
_MAX_REGISTERED = 4096


class Secret:
    """A string that never shows itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register(value)

    def get(self) -> str:
        """The real value, for the one place that sends it to the ERP."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class _Registry:
    def __init__(self) -> None:
        self._values: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self._snapshot: tuple[str, ...] = ()

    def add(self, value: str) -> None:
        if len(value) < _MIN_REDACT_LEN or value in self._values:
            return
        with self._lock:
            self._values[value] = None
            while len(self._values) > _MAX_REGISTERED:
                del self._values[next(iter(self._values))]
            # Longest first, so a secret that contains another is scrubbed whole.
            self._snapshot = tuple(sorted(self._values, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for value in self._snapshot:
            if value in text:
                text = text.replace(value, MASK)
        return text


_registry = _Registry()


def register(value: str) -> None:
    """Make ``value`` known to the redactor (tokens are registered as they are issued)."""
    _registry.add(value)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by the mask."""
    return _registry.scrub(text)
