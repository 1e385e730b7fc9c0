"""A lean HTTP/1.1 client for the proxy's upstream requests.

aiohttp's ``ClientSession`` spent more of the broker's CPU per request than everything else
the broker does (timers per read, three header dicts per request, tracing hooks, cookie and
proxy handling the sidecar has no use for). This client does only what a reverse proxy needs:
a keep-alive pool per ERP over asyncio protocols, the request written in one call, the
response parsed by ``httptools`` (llhttp, the parser Node.js uses), its body handed on as it
arrives with flow control both ways.

What it guarantees:

- the request goes out as given: method, target and headers byte for byte (no header added
  but ``Host`` and the body's framing; a header holding CR, LF or NUL is refused, as aiohttp
  refuses it);
- an answer ends where its framing says (:func:`body_framing`, decided once from the head);
  a connection goes back to the pool only after its answer was read to that end, the ERP did
  not ask to close it, and not one byte came beyond it. Anything else (a body left half read,
  bytes after the answer or on an idle connection, a cancelled request, a malformed answer)
  closes it: the next request never reads another's bytes;
- a request is never sent twice here: a pooled connection the ERP had closed before any byte
  of the answer came back raises :class:`StaleConnection`, and the proxy's send loop decides
  whether to send again;
- no read waits longer than ``read_timeout`` for the next byte; waiting for a free
  connection and connecting (TCP and TLS) take at most ``connect_timeout`` together; an idle
  connection is not reused after ``keepalive_timeout`` (before the ERP closes it).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import NamedTuple

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .flow import Chunk, Chunks, Reading

#: Idle connections older than this are closed rather than reused, by default: below the
#: keep-alive timeout of common servers (Apache httpd closes idle connections after 5 s, nginx
#: after 75 s, IIS after 120 s), so the broker retires a connection before the ERP does.
KEEPALIVE_TIMEOUT = 4.0
#: Largest response head (status line and headers, interim answers included) accepted.
MAX_HEAD = 64 * 1024
#: Bodies at most this long are copied out of a read; longer ones are handed on as views.
_COPY_UNDER = 4096
#: Methods that carry ``Content-Length: 0`` when sent without a body (aiohttp's rule).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The ERP's connection failed in a way the proxy reports as unreachable."""


class UpstreamClosed(UpstreamError):
    """The ERP closed the connection before its answer was complete."""


class StaleConnection(UpstreamClosed):
    """A connection reused from the pool was found closed before any byte of the answer came
    back: the ERP closed it while idle, and never saw this request. The proxy's send loop may
    send the request again (on a fresh connection: ``Pool.request(..., fresh=True)``)."""


class PoolTimeout(UpstreamError, TimeoutError):
    """No connection to the ERP came free (or could be opened) within the connect timeout."""


class UpstreamProtocolError(UpstreamError):
    """The ERP's answer is not valid HTTP/1.1."""


class UpstreamReadTimeout(UpstreamError, TimeoutError):
    """No byte arrived from the ERP within the read timeout."""


class InvalidHeader(ValueError):
    """A header to send holds a control character (a header injection, refused)."""


Body = bytes | AsyncIterator[bytes] | None

#: :attr:`Framing.body` of a chunked body.
CHUNKED = -1
#: :attr:`Framing.body` of a body that ends when the ERP closes the connection.
UNTIL_CLOSE = -2


class Framing(NamedTuple):
    """How an answer's body is delimited, from its head (see :func:`body_framing`)."""

    #: Body bytes to read (0: no body), or :data:`CHUNKED`, or :data:`UNTIL_CLOSE`.
    body: int
    #: The body's length the broker announces to the app in its own ``Content-Length``
    #: (for HEAD and 304, the length announced by the ERP), or None.
    length: int | None


def body_framing(method: str, status: int, lengths: list[str], codings: list[str]) -> Framing:
    """The body's framing of an answer to ``method`` (RFC 9112, 6.3), decided once, from the
    head alone, before any byte of the body is read.

    No body after HEAD, 1xx, 204 or 304 whatever the headers say; else chunked, a length, or
    until the ERP closes. The framing headers are checked whatever the status, and only one
    reading is accepted: a ``Transfer-Encoding`` other than exactly ``chunked`` (``xchunked``,
    ``gzip, chunked``), a ``Content-Length`` that is not one decimal number (optional
    whitespace around it), or both headers together (a smuggling pattern, RFC 9112 6.1) raise
    :class:`UpstreamProtocolError`: the broker does not guess where an answer ends.

    ``lengths`` and ``codings`` are the values of the answer's ``Content-Length`` and
    ``Transfer-Encoding`` headers, in order, as they came.
    """
    length: int | None = None
    if lengths:
        value = lengths[0].strip(" \t")
        if len(lengths) > 1 or not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise UpstreamProtocolError("the ERP's answer has an invalid Content-Length")
        length = int(value)
    if codings:
        if [c.strip(" \t").lower() for v in codings for c in v.split(",")] != ["chunked"]:
            shown = ", ".join(codings)[:60]
            raise UpstreamProtocolError(
                f"the ERP's answer has a transfer coding the broker does not support: {shown!r}"
            )
        if length is not None:
            raise UpstreamProtocolError(
                "the ERP's answer has both Content-Length and Transfer-Encoding"
            )
    if method == "HEAD" or status < 200 or status == 304:
        return Framing(0, length if status >= 200 else None)
    if status == 204:
        return Framing(0, None)  # a 204 has no Content-Length (RFC 9110, 8.6)
    if codings:
        return Framing(CHUNKED, None)
    if length is not None:
        return Framing(length, length)
    return Framing(UNTIL_CLOSE, None)


class Pool:
    """Keep-alive connections to one origin (``scheme://host:port``)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        default_port = 443 if ssl_context is not None else 80
        host_header = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_header = f"{host_header}:{port}"
        self._host_line = f"Host: {host_header}\r\n"
        self._idle: list[_Connection] = []
        #: Connections established (counted from ``connection_made`` to their loss)...
        self._open = 0
        #: ... and being established.
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections established and not closed, idle or carrying a request."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Body = None,
        *,
        length: int | None = None,
        fresh: bool = False,
    ) -> Response:
        """Send one request and return once the answer's head has arrived.

        ``target`` is the request target as it goes on the wire (path and query, already
        encoded). ``body`` is bytes, an async iterator of chunks (sent with ``length`` as its
        ``Content-Length`` when given, else chunked) or None. ``fresh``: on a new connection,
        not one from the pool (after a :class:`StaleConnection`).
        """
        head = self._head(method, target, headers, body, length)
        chunked = body is not None and not isinstance(body, bytes) and length is None
        conn = await self._acquire(fresh=fresh)
        return await conn.send(method, head, body, chunked)

    def _head(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: Body,
        length: int | None,
    ) -> bytes:
        fields = [f"{name}: {value}" for name, value in headers]
        # CR or LF in a field would start another header (an injection), NUL cuts it short:
        # refused, as aiohttp refuses them. One memchr-speed test per character over the
        # joined fields; other control characters cannot arrive here (the listener's
        # parser refuses them in the app's headers, tokens are checked once when issued).
        joined = "".join(fields)
        if "\r" in joined or "\n" in joined or "\x00" in joined:
            raise InvalidHeader("a header to send to the ERP holds CR, LF or NUL; refused")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        if fields:
            lines.append("\r\n".join(fields))
            lines.append("\r\n")
        if body is None:
            if method not in _BODYLESS_METHODS:
                lines.append("Content-Length: 0\r\n")
        elif isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        else:
            lines.append("Transfer-Encoding: chunked\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _acquire(self, *, fresh: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        # Waiting for a free place and connecting share one limit (aiohttp's connect timeout).
        deadline = loop.time() + self.connect_timeout
        while True:
            if self._closed:
                raise UpstreamError("the connection pool is closed")
            while self._idle and not fresh:
                conn = self._idle.pop()  # the most recently used: the least likely stale
                if conn.closed or loop.time() - conn.idle_since > self.keepalive_timeout:
                    conn.close()
                    continue
                conn.reused = True
                return conn
            if self._open + self._connecting < self.limit:
                break
            if fresh and self._idle:
                self._idle.pop(0).close()  # make room for the fresh connection
                continue
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                # Woken for a free place but cancelled before taking it: pass the turn on,
                # or the next waiter waits for a wake-up that already happened.
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout(
                        f"all {self.limit} connections to the ERP stayed busy for "
                        f"{self.connect_timeout:g}s"
                    ) from None
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._connecting += 1
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, self.read_timeout),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                )
        finally:
            self._connecting -= 1
            self._wake()
        return conn

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = conn.idle_since = asyncio.get_running_loop().time()
        idle = self._idle
        # Retire the connections idle too long (the oldest first), before the ERP closes them.
        while idle and now - idle[0].idle_since > self.keepalive_timeout:
            idle.pop(0).close()
        idle.append(conn)
        self._wake()

    def _opened(self, conn: _Connection) -> None:
        self._open += 1

    def _forget(self, conn: _Connection) -> None:
        """``conn`` is closed: it no longer counts and no longer waits in the idle list."""
        self._open -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._wake()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class Response:
    """An ERP's answer: its head at once, its body as it arrives."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_keep_alive",
        "_remaining",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
        framing: Framing,
    ) -> None:
        self.status = status
        self.reason = reason
        #: The ERP's headers as they came, framing headers included (the proxy writes its
        #: own framing from ``content_length``).
        self.headers = headers
        #: The length of the body (see :attr:`Framing.length`), checked; None if not known.
        self.content_length = framing.length
        self._conn = conn
        self._chunks = Chunks(conn)
        self._done = False
        self._keep_alive = keep_alive
        #: Body bytes still to come when the length is known, else None.
        self._remaining: int | None = framing.body if framing.body > 0 else None

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        while not self._done:
            # The whole body is wanted: what has arrived must not hold back the rest (the
            # pause at HIGH_WATER bounds what an iter_any consumer leaves waiting).
            conn.resume_reading()
            await conn.wait()
        return self._chunks.take_all()

    async def iter_any(self) -> AsyncIterator[Chunk]:
        """The body in whatever pieces have arrived, each as soon as it has."""
        conn = self._conn
        while True:
            if self._chunks:
                yield self._chunks.take()
            elif self._done:
                return
            else:
                await conn.wait()

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read to its end; close it
        otherwise."""
        conn = self._conn
        if (
            self._done
            and self._keep_alive
            and conn.request_sent
            and not conn.closed
            and conn.response is self
        ):
            conn.response = None
            conn.state = _IDLE
            # The body may have ended in the read that paused reading, and not been read:
            # an idle connection must read, to see the ERP closing it (or sending what it
            # must not: the connection is closed then).
            conn.resume_reading()
            conn.pool._put(conn)
        elif conn.response is self:
            conn.close()
        # else: released before; the connection may carry another request now

    def close(self) -> None:
        """Close the connection: the body is not read to its end."""
        if self._conn.response is self:
            self._conn.close()

    def _feed(self, chunk: Chunk) -> None:
        self._chunks.put(chunk)


# What a connection is reading (_Connection.state).
_IDLE = 0  # nothing: no request in flight, or its answer was released
_HEAD = 1  # an answer's head (interim 1xx answers included)
_LENGTH = 2  # a body of known length
_CHUNKED = 3  # a chunked body (through the parser)
_UNTIL_CLOSE = 4  # a body that ends with the connection
_DONE = 5  # nothing more: the answer is complete, not yet released
_SMALL = 6  # a small body of known length, whole behind its head: through the parser


class _Beyond(Exception):
    """Bytes after a complete answer (raised in a parser callback to stop it there)."""


def _piece(data: bytes, start: int, stop: int) -> Chunk:
    """``data[start:stop]``: the bytes themselves when whole, a copy when short, else a view."""
    if start == 0 and stop == len(data):
        return data
    if stop - start <= _COPY_UNDER:
        return data[start:stop]
    return memoryview(data)[start:stop]


def _crlf_run(data: Chunk) -> int:
    """How many CR and LF bytes end ``data``."""
    end = len(data)
    i = end
    while i and data[i - 1] in (10, 13):
        i -= 1
    return end - i


class _Connection(Reading, asyncio.Protocol):
    """One connection to the ERP; it carries one request at a time."""

    def __init__(self, pool: Pool, read_timeout: float) -> None:
        self.pool = pool
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = _IDLE
        self.closed = False
        #: Counted among the pool's open connections (from ``connection_made``).
        self.counted = False
        self.reused = False
        #: True once any byte of the current answer has arrived.
        self.answered = False
        self.idle_since = 0.0
        self.response: Response | None = None
        #: False while (and if) the request's body was cut short: the connection closes.
        self.request_sent = True
        self.error: BaseException | None = None
        self._method = ""
        self._reason: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        #: The values of the head's Content-Length and Transfer-Encoding headers.
        self._lengths: list[str] = []
        self._codings: list[str] = []
        self._head_size = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Bytes of the answer's heads read so far (bounded by MAX_HEAD).
        self._head_bytes = 0
        #: The first bytes of the head being read (its protocol: "HTTP/1.").
        self._prefix = b""
        #: The last bytes (up to 3) of the head being read: its end may span two reads.
        self._tail = b""
        #: True while the parser is fed a head up to its end (see on_headers_complete).
        self._head_end_fed = False
        #: CR and LF bytes that ended the chunked body's reads so far (see _chunked).
        self._crlf = 0
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- the request ------------------------------------------------------------------

    async def send(self, method: str, head: bytes, body: Body, chunked: bool) -> Response:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            if self.reused:
                raise StaleConnection("the ERP had closed the pooled connection")
            raise UpstreamClosed("the ERP closed the connection")
        self._method = method
        self._head_bytes = 0
        self._prefix = self._tail = b""
        self.state = _HEAD
        self.answered = False
        self.response = None
        self.error = None
        self.request_sent = False
        try:
            if body is None:
                transport.write(head)
                self.request_sent = True
            elif isinstance(body, bytes):
                if len(body) <= 16 * 1024:
                    transport.write(head + body)
                else:
                    transport.writelines((head, body))
                self.request_sent = True
            else:
                transport.write(head)
                await self._send_stream(body, chunked)  # sets request_sent at the body's end
            while self.response is None:
                await self.wait()
        except BaseException as exc:
            self.close()
            if isinstance(exc, UpstreamClosed) and self.reused and not self.answered:
                # Closed by the ERP while idle in the pool: it never saw the request.
                raise StaleConnection(f"the ERP had closed the pooled connection ({exc})") from exc
            raise
        return self.response

    async def _send_stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.response is not None:
                return  # the ERP answered early (an error, say): stop; the connection closes
            if self.closed:
                raise UpstreamClosed("the ERP closed the connection while the body was sent")
            if not chunk:
                continue
            if chunked:
                transport.writelines((f"{len(chunk):x}\r\n".encode(), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._writing_paused:
                await self._wait_drain()
                if self.response is not None:
                    return
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")
        self.request_sent = True

    async def _wait_drain(self) -> None:
        # An answer ends the wait too: an ERP that answers early (413, 401) may read no more
        # of the body, and may close the connection once it has answered.
        while self._writing_paused and not self.closed and self.response is None:
            drain = self._drain = self.loop.create_future()
            # An ERP that takes no byte of the body for the read timeout is as stuck as one
            # that sends none.
            timer = self.loop.call_later(self.read_timeout, self._timed_out, drain)
            try:
                await drain
            finally:
                timer.cancel()
                self._drain = None
        if self.closed and self.response is None:
            raise self.error or UpstreamClosed("the ERP closed the connection")

    async def wait(self) -> None:
        """Until the next event of the answer: its head, body bytes, its end or an error;
        at most the read timeout."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise UpstreamClosed("the ERP closed the connection")
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(self.read_timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(
                UpstreamReadTimeout(f"the ERP sent nothing for {self.read_timeout:g}s")
            )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if not self.closed:
            self._lost(UpstreamClosed("the connection to the ERP was closed"))
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = transport  # type: ignore[assignment]
        self.pool._opened(self)
        self.counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        self.answered = True
        pos = 0
        end = len(data)
        if self.state == _LENGTH:  # most reads: the rest of a body of known length
            pos = self._length_body(data, 0)
        while pos < end and not self.closed:
            state = self.state
            if state == _HEAD:
                pos = self._head(data, pos)
            elif state == _LENGTH:
                pos = self._length_body(data, pos)
            elif state == _CHUNKED:
                self._chunked(_piece(data, pos, end))
                pos = end
            elif state == _UNTIL_CLOSE:
                self._body_piece(_piece(data, pos, end))
                pos = end
            else:  # _DONE, _IDLE: nothing may come now
                self._beyond()
                return

    def _head(self, data: bytes, pos: int) -> int:
        """Feed the parser the head's bytes from ``pos``, up to the head's end at most;
        returns where they stop."""
        stop = -1
        tail = self._tail
        if tail:  # the end may straddle the previous read and this one
            found = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
            if found != -1:
                stop = pos + found + 4 - len(tail)
        if stop == -1:
            found = data.find(b"\r\n\r\n", pos)
            if found != -1:
                stop = found + 4
        last = len(data) if stop == -1 else stop
        self._head_bytes += last - pos
        if self._head_bytes > MAX_HEAD:
            self._fail(
                UpstreamProtocolError(f"the ERP's response head is larger than {MAX_HEAD} bytes")
            )
            return len(data)
        piece = data[pos:last] if pos or last != len(data) else data
        if len(self._prefix) < 7:
            self._prefix += piece[: 7 - len(self._prefix)]
        self._tail = b"" if stop != -1 else (tail + piece[-3:])[-3:]
        self._head_end_fed = stop != -1
        self._parse(piece)
        return last

    def _length_body(self, data: bytes, pos: int) -> int:
        response = self.response
        assert response is not None and response._remaining is not None
        remaining = response._remaining
        stop = min(len(data), pos + remaining)
        if pos and stop - pos == remaining <= _COPY_UNDER:
            # A small body whole behind its head (most answers): through the parser, which
            # ends the message and stays usable for the next answer.
            self.state = _SMALL
            self._parse(data[pos:stop])
            return stop
        response._remaining = remaining - (stop - pos)
        response._feed(_piece(data, pos, stop))
        if response._remaining == 0:
            self._complete()
        else:
            self._wake()
        return stop

    def _chunked(self, piece: Chunk) -> None:
        run = _crlf_run(piece)
        self._crlf = self._crlf + run if run == len(piece) else run
        if self._parse(piece) and self.state == _DONE and self._crlf > 4:
            # The parser skips CR and LF between messages; the answer's own end is exactly
            # 4 of them ("0\r\n\r\n", or after its trailers): more is beyond the answer.
            self._beyond()

    def _body_piece(self, piece: Chunk) -> None:
        response = self.response
        assert response is not None
        response._feed(piece)
        self._wake()

    def _complete(self, *, renew: bool = True) -> None:
        """The final answer is complete; ``renew``: the parser was left mid-message (a body
        read without it, or an answer to HEAD), a new one for the next answer."""
        response = self.response
        assert response is not None
        response._done = True
        self.state = _DONE
        if renew:
            self.parser = httptools.HttpResponseParser(self)
        self._wake()

    def _beyond(self) -> None:
        """Bytes after a complete answer, or on an idle connection: the answer stands, the
        connection is never reused."""
        if self.response is not None:
            self.response._keep_alive = False
        self.close()

    def _parse(self, data: Chunk) -> bool:
        """Feed the parser; False when the answer turned out malformed or complete with bytes
        beyond it (the connection is closed then)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the ERP switched protocols; not supported"))
            return False
        except httptools.HttpParserError as exc:
            if self.state == _DONE:
                self._beyond()  # another message began after the answer
                return False
            cause = exc.__context__
            if isinstance(cause, UpstreamProtocolError):
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError(f"the ERP sent a malformed response: {exc}"))
            return False
        return True

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        response = self.response
        if self.state == _UNTIL_CLOSE and exc is None and response is not None:
            # A body delimited by the end of the connection.
            response._done = True
            response._keep_alive = False
            self.state = _DONE
        detail = f": {type(exc).__name__}" if exc is not None else ""
        # The transport is spent: asyncio's, lost once its buffer was flushed after close(),
        # fails on a later abort() (its loop is gone).
        self.transport = None
        self._lost(UpstreamClosed(f"the ERP closed the connection{detail}"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _lost(self, error: UpstreamError) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.pool._forget(self)
        response = self.response
        if self.error is None and (response is None or not response._done):
            self.error = error
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self._wake()
        self.close()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state != _HEAD:
            raise _Beyond  # a second message after the answer: stops the parser
        self._reason.clear()
        self._headers = []
        self._lengths = []
        self._codings = []
        self._head_size = 0

    def on_status(self, status: bytes) -> None:
        self._reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise UpstreamProtocolError(f"the ERP's response head is larger than {MAX_HEAD} bytes")
        pair = (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        self._headers.append(pair)
        if len(name) in (14, 17):  # the framing headers, noted here: cheaper than looked up
            lower = name.lower()
            if lower == b"content-length":
                self._lengths.append(pair[1])
            elif lower == b"transfer-encoding":
                self._codings.append(pair[1])

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if self._prefix != b"HTTP/1." or version not in ("1.1", "1.0"):
            raise UpstreamProtocolError("the ERP's answer is not HTTP/1.x")
        if not self._head_end_fed:  # cannot happen with llhttp's strict CRLF; never guess
            raise UpstreamProtocolError("the ERP's answer head ends where the broker cannot tell")
        status = parser.get_status_code()
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        framing = body_framing(self._method, status, self._lengths, self._codings)
        if status < 200:
            # 100 Continue, 103 Early Hints: the answer is still to come, with its own head.
            self._prefix = b""
            return
        keep_alive = version == "1.1" and framing.body != UNTIL_CLOSE
        if keep_alive and "Connection" in headers:
            keep_alive = not any(
                token.strip(" \t").lower() == "close"
                for value in headers.getall("Connection")
                for token in value.split(",")
            )
        self.response = Response(
            self,
            status,
            b"".join(self._reason).decode("latin-1"),
            headers,
            keep_alive,
            framing,
        )
        body = framing.body
        if body == 0:
            # llhttp ends bodiless messages itself, but for HEAD it waits for the announced body.
            self._complete(renew=self._method == "HEAD")
        elif body > 0:
            self.state = _LENGTH
        elif body == CHUNKED:
            self.state = _CHUNKED
            self._crlf = 0
        else:
            self.state = _UNTIL_CLOSE
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # an upload waiting for the ERP to read: stop it

    def on_body(self, body: bytes) -> None:
        response = self.response
        if (self.state == _CHUNKED or self.state == _SMALL) and response is not None:
            response._feed(body)
            self._wake()

    def on_message_complete(self) -> None:
        if self.state == _CHUNKED or self.state == _SMALL:
            self._complete(renew=False)
