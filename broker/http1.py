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
- a connection goes back to the pool only after its response was read to the end and the
  ERP did not ask to close it; anything else (a body left half read, a cancelled request, a
  malformed response) closes it;
- a request is sent twice only when a connection from the pool turns out to have been closed
  by the ERP before any byte of the answer came back, and the method is idempotent with a
  body that can be sent again (as Go's and urllib3's clients do): the ERP never saw it;
- no read waits longer than ``read_timeout`` for the next byte; connecting (TCP and TLS)
  takes at most ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import AsyncIterator, Iterable

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .flow import Chunk, Chunks, Reading, answer_has_body

#: Idle connections older than this are closed rather than reused (aiohttp's default).
KEEPALIVE_TIMEOUT = 15.0
#: Reads larger than this that start a response have their head parsed apart from the body.
_SPLIT_AT = 16 * 1024
#: Largest response head (status line and headers) accepted.
MAX_HEAD = 64 * 1024
#: Methods sent again on a fresh connection when a pooled one was found closed.
_REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Methods that carry ``Content-Length: 0`` when sent without a body (aiohttp's rule).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class UpstreamError(Exception):
    """The ERP's connection failed in a way the proxy reports as unreachable."""


class UpstreamClosed(UpstreamError):
    """The ERP closed the connection before its answer was complete."""


class UpstreamProtocolError(UpstreamError):
    """The ERP's answer is not valid HTTP/1.1."""


class UpstreamReadTimeout(UpstreamError, TimeoutError):
    """No byte arrived from the ERP within the read timeout."""


class InvalidHeader(ValueError):
    """A header to send holds a control character (a header injection, refused)."""


Body = bytes | AsyncIterator[bytes] | None


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
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
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
    ) -> Response:
        """Send one request and return once the answer's head has arrived.

        ``target`` is the request target as it goes on the wire (path and query, already
        encoded). ``body`` is bytes, an async iterator of chunks (sent with ``length`` as its
        ``Content-Length`` when given, else chunked) or None.
        """
        head = self._head(method, target, headers, body, length)
        chunked = body is not None and not isinstance(body, bytes) and length is None
        conn = await self._acquire(fresh=False)
        try:
            return await conn.send(method, head, body, chunked)
        except UpstreamClosed:
            if not (
                conn.reused
                and not conn.answered
                and method in _REPLAYABLE_METHODS
                and (body is None or isinstance(body, bytes))
            ):
                raise
        # A pooled connection the ERP had closed: it never saw this request.
        conn = await self._acquire(fresh=True)
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
        while True:
            if self._closed:
                raise UpstreamError("the connection pool is closed")
            while self._idle and not fresh:
                conn = self._idle.pop()  # the most recently used: the least likely stale
                if conn.closed or loop.time() - conn.idle_since > KEEPALIVE_TIMEOUT:
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
                await waiter
            except BaseException:
                # Woken for a free place but cancelled before taking it: pass the turn on,
                # or the next waiter waits for a wake-up that already happened.
                if waiter.done() and not waiter.cancelled():
                    self._wake()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
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
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)
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
        "_until_eof",
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
        until_eof: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._conn = conn
        self._chunks = Chunks(conn)
        self._done = False
        self._keep_alive = keep_alive
        self._until_eof = until_eof
        #: Body bytes still to come when the length is known (Content-Length), else None.
        self._remaining: int | None = None

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
            # The body may have ended in the read that paused reading, and not been read:
            # an idle connection must read, to see the next answer or the ERP closing it.
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


class _Connection(Reading, asyncio.Protocol):
    """One connection to the ERP; it carries one request at a time."""

    def __init__(self, pool: Pool, read_timeout: float) -> None:
        self.pool = pool
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
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
        self._head_size = 0
        self._waiter: asyncio.Future[None] | None = None
        #: Bytes read while no answer head was complete (bounded by MAX_HEAD).
        self._head_bytes = 0
        #: True while the rest of a body of known length arrives (see data_received).
        self._raw = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- the request ------------------------------------------------------------------

    async def send(self, method: str, head: bytes, body: Body, chunked: bool) -> Response:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamClosed("the ERP closed the connection")
        self._method = method
        self._head_bytes = 0
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
        except BaseException:
            self.close()
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
        if self._raw:
            self._raw_body(data)
            return
        if len(data) > _SPLIT_AT and self.response is None:
            # A head with much of a large body behind it in one read: the parser takes the
            # head only, the body goes on without a copy (views of the bytes read).
            end = data.find(b"\r\n\r\n")
            if end != -1:
                view = memoryview(data)
                if not self._parse(view[: end + 4]):
                    return
                if self._raw:
                    self._raw_body(view[end + 4 :])
                    return
                data = view[end + 4 :]  # type: ignore[assignment]
        self._parse(data)

    def _parse(self, data: bytes | memoryview) -> bool:
        """Feed the parser; False when the answer turned out malformed (the connection is
        closed then)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the ERP switched protocols; not supported"))
            return False
        except httptools.HttpParserError as exc:
            response = self.response
            if response is not None and response._done:
                # Garbage after a complete answer: the answer stands, the connection closes.
                response._keep_alive = False
                self.close()
                return False
            cause = exc.__context__
            if isinstance(cause, UpstreamProtocolError):
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError(f"the ERP sent a malformed response: {exc}"))
            return False
        response = self.response
        if response is None:
            # httptools buffers a header line until it ends: bound the head as a whole.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(
                    UpstreamProtocolError(
                        f"the ERP's response head is larger than {MAX_HEAD} bytes"
                    )
                )
                return False
        elif not response._done and response._remaining:
            # The rest of a body of known length: handed on as it arrives, without the
            # parser (which would copy every chunk once more).
            self._raw = True
        return True

    def _raw_body(self, data: bytes | memoryview) -> None:
        response = self.response
        assert response is not None and response._remaining is not None
        remaining = response._remaining
        if len(data) > remaining:
            # More than the announced length, on a connection that carries one request at
            # a time: the ERP is confused; use what was announced, then close.
            data = data[:remaining]
            response._keep_alive = False
        response._remaining = remaining - len(data)
        response._feed(data)
        if response._remaining == 0:
            response._done = True
            self._raw = False
            # The parser stopped mid-body: a new one for the next answer.
            self.parser = httptools.HttpResponseParser(self)
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        response = self.response
        if response is not None and response._until_eof and not response._done and exc is None:
            response._done = True  # a body delimited by the end of the connection
            response._keep_alive = False
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
        self._reason.clear()
        self._headers = []
        self._head_size = 0

    def on_status(self, status: bytes) -> None:
        self._reason.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise UpstreamProtocolError(f"the ERP's response head is larger than {MAX_HEAD} bytes")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # 100 Continue, 103 Early Hints: the answer is still to come
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        head_only = self._method == "HEAD"
        # The body's framing, decided once: none, chunked, a length, or until the ERP closes.
        has_body = answer_has_body(self._method, status)
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        until_eof = has_body and not chunked and "Content-Length" not in headers
        self.response = Response(
            self,
            status,
            b"".join(self._reason).decode("latin-1"),
            headers,
            # llhttp would wait for a HEAD answer's announced body: never reuse the connection
            keep_alive=self.parser.should_keep_alive() and not head_only,
            until_eof=until_eof,
        )
        if has_body and not chunked:
            self.response._remaining = self.response.content_length  # None: until_eof
        if head_only:
            self.response._done = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # an upload waiting for the ERP to read: stop it

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response._done:
            if response._remaining is not None:
                response._remaining -= len(body)
            response._feed(body)
            self._wake()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        response = self.response
        if response is not None:
            response._done = True
            self._wake()
