"""Secret values: masked wherever they could be printed, and known to the log redactor.

Every configured secret and every token the broker holds is registered here, so that the
redaction processor in :mod:`broker.logs` can scrub it from any log line, even one that embeds
it by accident (an upstream error body that echoes a token, say).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

MASK = "***"
#: Shorter values are too likely to occur by chance to be scrubbed from text.
_MIN_REDACT_LEN = 6
#: Tokens come and go; keep the registry from growing without bound.
_MAX_REGISTERED = 4096
#: Only secrets no longer than the text can occur in it. Up to this many of those, each is
#: looked for in turn; beyond, an index of their last characters is used, so that a
#: long-running broker (one token per refresh, thousands in all) does not pay a thousand
#: substring searches for every string it logs.
_LINEAR_MAX = 64


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
        #: The last _MIN_REDACT_LEN characters of each secret → the secrets ending so.
        self._index: dict[str, tuple[str, ...]] | None = None
        #: What scrub reads, replaced as a whole: the secrets longest first, shortest first,
        #: the latter's lengths (for bisect) and the index.
        self._state: tuple[
            tuple[str, ...], tuple[str, ...], tuple[int, ...], dict[str, tuple[str, ...]] | None
        ] = ((), (), (), None)

    def add(self, value: str) -> None:
        if len(value) < _MIN_REDACT_LEN or value in self._values:
            return
        with self._lock:
            self._values[value] = None
            while len(self._values) > _MAX_REGISTERED:
                del self._values[next(iter(self._values))]
            # Longest first, so a secret that contains another is scrubbed whole.
            snapshot = tuple(sorted(self._values, key=len, reverse=True))
            index: dict[str, tuple[str, ...]] | None = None
            if len(snapshot) > _LINEAR_MAX:
                index = {}
                for secret in snapshot:  # longest first within each entry, too
                    key = secret[-_MIN_REDACT_LEN:]
                    index[key] = (*index.get(key, ()), secret)
            self._index = index
            self._snapshot = snapshot
            ascending = snapshot[::-1]
            lengths = tuple(len(secret) for secret in ascending)
            self._state = (snapshot, ascending, lengths, index)

    def scrub(self, text: str) -> str:
        if len(text) < _MIN_REDACT_LEN:
            return text  # shorter than any registered secret
        descending, ascending, lengths, index = self._state
        if index is None:  # few secrets: look for each (longest first)
            for value in descending:
                if value in text:
                    text = text.replace(value, MASK)
            return text
        # Log values are mostly short (ids, paths, timestamps) and tokens long: a short text
        # is looked for only the few secrets short enough to fit in it.
        fit = bisect.bisect_right(lengths, len(text))
        if fit <= _LINEAR_MAX:
            for value in reversed(ascending[:fit]):
                if value in text:
                    text = text.replace(value, MASK)
            return text
        for _ in range(4):  # a replacement could complete another secret: look again
            found = _find_indexed(text, index)
            if not found:
                break
            for value in sorted(found, key=len, reverse=True):
                text = text.replace(value, MASK)
        return text


def _find_indexed(text: str, index: dict[str, tuple[str, ...]]) -> set[str]:
    """The registered secrets that occur in ``text``, found by their last characters."""
    found: set[str] = set()
    get = index.get
    width = _MIN_REDACT_LEN
    for end in range(width, len(text) + 1):
        candidates = get(text[end - width : end])
        if candidates:
            for value in candidates:
                start = end - len(value)
                if start >= 0 and text.startswith(value, start):
                    found.add(value)
    return found


_registry = _Registry()


def register(value: str) -> None:
    """Make ``value`` known to the redactor (tokens are registered as they are issued)."""
    _registry.add(value)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by the mask."""
    return _registry.scrub(text)
