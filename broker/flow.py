"""What the proxy's two HTTP/1.1 halves (:mod:`broker.server` towards the app,
:mod:`broker.http1` towards the ERPs) share: which answers carry a body, and flow control
(body pieces wait in a :class:`Chunks` queue for their reader, and reading from the peer
pauses while more than :data:`HIGH_WATER` bytes wait).
"""

from __future__ import annotations

import asyncio
import collections

#: Body bytes waiting for their reader before reading from the peer pauses.
HIGH_WATER = 256 * 1024

#: A piece of a body: the bytes read, or a view of them (no copy).
Chunk = bytes | memoryview


def answer_has_body(method: str, status: int) -> bool:
    """Whether an answer carries a body (RFC 9112, 6.3): never to HEAD, never 1xx, 204, 304,
    whatever its headers announce."""
    return method != "HEAD" and status >= 200 and status not in (204, 304)


class Reading:
    """``pause_reading``/``resume_reading`` for an asyncio protocol: each reaches the
    transport once, and never a closed one."""

    transport: asyncio.Transport | None
    closed: bool
    _reading_paused = False

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()


class Chunks:
    """Body pieces between a protocol and their reader, in order."""

    __slots__ = ("_flow", "_items", "size")

    def __init__(self, flow: Reading) -> None:
        self._flow = flow
        self._items: collections.deque[Chunk] = collections.deque()
        #: Bytes waiting.
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, chunk: Chunk) -> None:
        """Add a piece; past HIGH_WATER waiting, the peer's reading pauses."""
        self._items.append(chunk)
        self.size += len(chunk)
        if self.size > HIGH_WATER:
            self._flow.pause_reading()

    def take(self) -> Chunk:
        """The oldest piece (there must be one), as it came: joining pieces would copy every
        byte once more. Reading resumes once HIGH_WATER or less waits."""
        chunk = self._items.popleft()
        self.size -= len(chunk)
        if self.size <= HIGH_WATER:
            self._flow.resume_reading()
        return chunk

    def take_all(self) -> bytes:
        """Every piece, joined."""
        data = b"".join(self._items)
        self._items.clear()
        self.size = 0
        return data
