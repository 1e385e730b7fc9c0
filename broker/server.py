"""The proxy listener's HTTP/1.1 server: httptools (llhttp) over asyncio protocols.

aiohttp's server spent ~45 µs of CPU per request here against ~16 for a bare llhttp server
(bench/RESULTS.md): a request object with lazy properties, a response object prepared,
serialised and finished in several steps, and a payload writer per message. The proxy needs
none of that, so this server hands it a slim :class:`Request` and writes whole answers in one
call.

This is the wire: it speaks HTTP statuses only. What a refusal looks like to the app (the
broker's JSON error body) is the ``refusal`` callable's business (:mod:`broker.answers`).

What it guarantees:

- llhttp parses strictly: conflicting ``Content-Length``/``Transfer-Encoding``, duplicate
  lengths, obs-fold, CR/LF/NUL and other control characters in headers, bare LF line ends
  and invalid header names are refused with 400 before any handler runs. On top of llhttp:
  a request line over :data:`MAX_LINE_SIZE` gets 414; a header field over
  :data:`MAX_FIELD_SIZE`, more than :data:`MAX_HEADERS` fields or a head over
  :data:`MAX_HEAD_SIZE` 431; a method llhttp does not know 501; a version other than 1.0 and
  1.1 505; a missing (HTTP/1.1), repeated or invalid ``Host`` 400; a ``Transfer-Encoding``
  on HTTP/1.0 400 and one other than ``chunked`` 501; an Upgrade request with a body (llhttp
  would skip the body) 400. The connection closes after each refusal.
- one request at a time per connection, in order (pipelined requests wait their turn);
- bodies stream both ways with flow control: reading from the client pauses while what it
  sent is not taken; every write, whole answers included, waits while the client does not
  read (so a client that pipelines requests and reads nothing holds a bounded buffer);
- time is bounded (:class:`Timeouts`): a head that does not arrive in ``header`` seconds
  and a body that stalls for ``body`` seconds while it is read get 408; a client that reads
  nothing for ``write`` seconds while an answer waits is cut off; idle keep-alive
  connections close after ``keepalive``;
- closing while the client may still be sending (an early answer, a refusal) is lingering:
  our side is shut, what the client sends is read and dropped for at most ``lingering``
  seconds, so the client reads its answer rather than a reset;
- a client that goes away cancels its request's handler (and so its retries), and
  :attr:`Request.client_gone` says so;
- ``Expect: 100-continue`` is answered when the handler first reads the body;
- at shutdown the listener closes, idle connections close, in-flight requests finish.

Each connection has explicit states, after h11: the client's side (:data:`IDLE` between
requests, :data:`HEAD`, :data:`BODY`, :data:`DONE`, :data:`MUST_CLOSE` once nothing more
of it is parsed) and ours (:data:`IDLE`, :data:`SENDING`, :data:`MUST_CLOSE`,
:data:`LINGERING`, :data:`CLOSED`); the timeout that applies follows from them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import httptools
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from .flow import HIGH_WATER, Chunks, Reading, answer_has_body

log = structlog.get_logger("broker.listener")

#: The longest request line accepted (aiohttp's default), then 414.
MAX_LINE_SIZE = 8190
#: The longest header field (name and value) accepted, then 431.
MAX_FIELD_SIZE = 8190
#: The most header fields accepted, then 431.
MAX_HEADERS = 128
#: The largest whole head (request line and fields) accepted, then 431.
MAX_HEAD_SIZE = 64 * 1024
#: Idle keep-alive connections are closed after this (aiohttp's default).
KEEPALIVE_TIMEOUT = 75.0
#: The header, body and write timeouts' default (nginx's).
CLIENT_TIMEOUT = 60.0
#: How long a closing connection reads and drops what the client still sends (aiohttp's).
LINGERING_TIME = 10.0
#: At shutdown, how long handlers cancelled after the grace period get to unwind.
CANCEL_GRACE = 1.0

# Connection states (h11's names). The client's side: IDLE, HEAD, BODY, DONE, MUST_CLOSE.
# Ours: IDLE, SENDING, MUST_CLOSE, LINGERING, CLOSED.
IDLE = "idle"
HEAD = "head"
BODY = "body"
DONE = "done"
SENDING = "sending"
MUST_CLOSE = "must-close"
LINGERING = "lingering"
CLOSED = "closed"

_NEVER = math.inf
#: SO_LINGER on, 0 s: closing resets the connection.
_RESET = struct.pack("ii", 1, 0)
#: A ``Host`` value: a reg-name or IPv4 address, or an IP literal, and an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")

_REASONS: dict[int, str] = {}


def reason_for(status: int) -> str:
    reason = _REASONS.get(status)
    if reason is None:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        _REASONS[status] = reason
    return reason


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds the listener waits for the client (config key ``client_timeouts``)."""

    #: From a request's first byte to the end of its head; then 408.
    header: float = CLIENT_TIMEOUT
    #: Between two pieces of a body being read; then 408 (or a cut, once answering).
    body: float = CLIENT_TIMEOUT
    #: For a client that reads nothing while an answer waits to be written; then cut off.
    write: float = CLIENT_TIMEOUT
    #: An idle keep-alive connection; then closed.
    keepalive: float = KEEPALIVE_TIMEOUT
    #: Reading and dropping what a client sends after its answer; then closed.
    lingering: float = LINGERING_TIME


class _Date:
    """The ``Date`` header's value, formatted once a second."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
            cls.second = second
        return cls.value


class Refusal(Exception):
    """A request the listener refuses itself: an HTTP ``status`` and a message for the app.
    Answered (by the server's ``refusal`` callable) and the connection closed. Raised from
    a body read too (a body the parser refused, or that stalled: 408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Response:
    """A whole answer: status, headers as given, body."""

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason_for(status) if reason is None else reason
        self.headers = list(headers)
        self.body = body


#: What the app gets for a refusal.
RefusalAnswer = Callable[[Refusal], Response]


def plain_refusal(refusal: Refusal) -> Response:
    """A refusal as a bare HTTP server answers it (the broker gives the server its own)."""
    return Response(
        refusal.status, [("Content-Type", "text/plain; charset=utf-8")], refusal.message.encode()
    )


class BodyReader:
    """The request body as it arrives (``readany``), with flow control towards the client."""

    __slots__ = ("_chunks", "_conn", "_error", "_waiter", "done", "expect_continue")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks = Chunks(conn)
        #: The whole body has arrived.
        self.done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: The client waits for ``100 Continue`` before it sends the body.
        self.expect_continue = False

    async def readany(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            if self._chunks:
                return bytes(self._chunks.take())
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            conn = self._conn
            if self.expect_continue:
                self.expect_continue = False
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            conn.resume_reading()
            conn.expect_body()
            self._waiter = conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)

    def feed(self, chunk: bytes) -> None:
        self._chunks.put(chunk)
        self._wake()

    def end(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self._error = error
            self._wake()

    @property
    def waiting(self) -> bool:
        """Whether a reader waits for the client's next piece."""
        return self._waiter is not None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Request:
    """One request as the proxy sees it."""

    __slots__ = (
        "_conn",
        "_path",
        "body_exists",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "started",
        "version",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        raw_path: str,
        version: str,
        headers: CIMultiDictProxy[str],
        keep_alive: bool,
        body_exists: bool,
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.method = method
        #: The request target as sent: path and query, still encoded.
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body_exists = body_exists
        self.content_length = content_length
        self.content = BodyReader(conn)
        self._path: str | None = None
        #: Whether the answer's head has been written (by :meth:`start`).
        self.started = False

    @property
    def path(self) -> str:
        """The path, decoded (for messages and logs; the proxy forwards ``raw_path``)."""
        if self._path is None:
            path = self.raw_path.partition("?")[0]
            self._path = unquote(path) if "%" in path else path
        return self._path

    @property
    def client_gone(self) -> bool:
        """Whether the client closed the connection, or was cut off for reading nothing,
        before its answer was all written (nginx logs these as 499)."""
        return self._conn.client_gone

    async def read(self) -> bytes:
        return await self.content.read()

    @property
    def remote(self) -> str | None:
        """The client's address (its host, without the port), if the socket has one."""
        transport = self._conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    # -- streaming an answer --------------------------------------------------------------

    def start(
        self, status: int, reason: str, headers: list[tuple[str, str]], *, length: int | None
    ) -> bool:
        """Write the answer's head. ``length`` is the body's, if known; else the body is
        chunked (HTTP/1.1) or delimited by closing the connection (HTTP/1.0). Returns
        whether the body is chunked."""
        self.started = True
        conn = self._conn
        chunked = False
        if length is None and answer_has_body(self.method, status):
            if self.version == "1.1":
                headers.append(("Transfer-Encoding", "chunked"))
                chunked = True
            else:
                self.keep_alive = False
        conn.write(conn.head(self, status, reason, headers))
        return chunked

    async def write(self, chunk: bytes | memoryview, chunked: bool) -> None:
        if not chunk:
            return  # an empty chunk is the chunked terminator: the body would end here
        conn = self._conn
        if conn.writing_paused:
            await conn.drain()
        if chunked:
            conn.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            conn.write(chunk)

    def write_eof(self, chunked: bool) -> None:
        if chunked:
            self._conn.write(b"0\r\n\r\n")


Handler = Callable[[Request], Awaitable[Response | None]]


class _Close(Exception):
    """Nothing more can be sent on this connection: close it (the handler gave up on an
    answer already started, or failed after starting it)."""


class _Connection(Reading, asyncio.Protocol):
    """One client connection: requests parsed, handled one at a time, answered in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.timeouts = server.timeouts
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        #: The client's side and ours (see the module's docstring).
        self.their_state = IDLE
        self.our_state = IDLE
        #: When waiting for the client's bytes ends (keep-alive, head, body, lingering),
        #: and waiting for it to read (write); checked by the server's sweep.
        self.read_deadline = self.loop.time() + self.timeouts.keepalive
        self.write_deadline = _NEVER
        #: The client closed the connection, or was cut off for not reading.
        self.client_gone = False
        #: Requests parsed and not yet answered; the first is being handled.
        self._queue: collections.deque[Request] = collections.deque()
        #: The request whose body is being parsed (the last of the queue, or none).
        self._receiving: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._url: list[bytes] = []
        #: The head's size as the parser's callbacks have seen it, and the bytes of the
        #: reads that ended inside the head (a field llhttp is still gathering is in them).
        self._head_size = 0
        self._head_reads = 0
        #: Requests begun on this connection (a read in which one begins is not its head's).
        self._begun = 0
        self._headers: list[tuple[str, str]] = []
        #: What the listener refused: answered once the requests parsed before it are.
        self._refusal: Refusal | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.their_state is MUST_CLOSE:
            # Bytes after a CONNECT or an Upgrade request, after a refused one, or while
            # lingering: never parsed, never sent.
            return
        begun = self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or Upgrade (without a body): the request itself is answered (CONNECT is
            # refused by the proxy; an Upgrade header is hop-by-hop and dropped), then the
            # connection closes.
            self.their_state = MUST_CLOSE
            for request in self._queue:
                request.keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Refusal):
                self._refuse(cause)
            else:
                self._refuse(Refusal(400, "malformed HTTP request"))
        except httptools.HttpParserInvalidMethodError:
            self._refuse(Refusal(501, "the request method is not supported"))
        except httptools.HttpParserError as exc:
            reason = str(exc).split(":", 1)[0][:80]
            if "method" in reason:  # a method llhttp knows for RTSP only
                self._refuse(Refusal(501, "the request method is not supported"))
            elif reason == "Invalid HTTP version":
                self._refuse(Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served"))
            else:
                self._refuse(Refusal(400, f"malformed HTTP request ({reason})"))
        else:
            # llhttp gathers a header field whole before on_header sees it: the reads that
            # end inside a head count towards it, so a field that never ends is refused.
            if self.their_state is HEAD and self._begun == begun:
                self._head_reads += len(data)
                if self._head_reads > MAX_HEAD_SIZE:
                    self._refuse(Refusal(431, f"the request head is over {MAX_HEAD_SIZE} bytes"))
        if self._task is None and self._queue:
            self.our_state = SENDING
            self._task = self.loop.create_task(self._serve())

    def eof_received(self) -> bool | None:
        # A client that closes its side is gone (as aiohttp and nginx take it): the
        # transport closes, connection_lost cancels what it asked for.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.client_gone = True
        self.closed = True
        self.our_state = self.their_state = CLOSED
        self.server.connections.discard(self)
        self.server.check_drained()
        error = ConnectionResetError("the client closed the connection")
        for request in self._queue:
            request.content.fail(error)
        if self._task is not None:
            self._task.cancel()  # the client is gone: stop its request (and its retries)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(error)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.their_state = HEAD
        self._begun += 1
        self.read_deadline = self.loop.time() + self.timeouts.header
        self._url = []
        self._head_size = 0
        self._head_reads = 0
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        if self._head_size > MAX_LINE_SIZE:
            raise Refusal(414, f"the request line is longer than {MAX_LINE_SIZE} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD_SIZE:
            raise Refusal(431, f"a header field is longer than {MAX_FIELD_SIZE} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise Refusal(431, "too many header fields")
        self._head_size += size + 4
        if self._head_size > MAX_HEAD_SIZE:
            raise Refusal(431, f"the request head is over {MAX_HEAD_SIZE} bytes")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        _check_host(headers, version)
        length = headers.get("Content-Length")
        coding = headers.get("Transfer-Encoding")
        if coding is not None:
            _check_coding(coding, version)
        body_exists = coding is not None or (length is not None and length != "0")
        if body_exists and parser.should_upgrade():
            # llhttp would hand the body over as the upgraded protocol's first bytes.
            raise Refusal(400, "a request asking for an Upgrade cannot carry a body")
        request = Request(
            self,
            parser.get_method().decode("ascii", "replace"),
            b"".join(self._url).decode("utf-8", "surrogateescape"),
            version,
            headers,
            parser.should_keep_alive(),
            body_exists,
            int(length) if length is not None else None,
        )
        self._queue.append(request)
        if body_exists:
            self.their_state = BODY
            self._receiving = request
            if version == "1.1":
                expect = headers.get("Expect")
                request.content.expect_continue = (
                    expect is not None and expect.lower() == "100-continue"
                )
            if not request.content.expect_continue:
                self.read_deadline = self.loop.time() + self.timeouts.body
            else:
                self.read_deadline = _NEVER  # the client waits for us
        else:
            request.content.done = True
            self.their_state = DONE
            self.read_deadline = _NEVER
        if len(self._queue) > 1:
            self.pause_reading()  # pipelined: one at a time

    def on_body(self, body: bytes) -> None:
        if self._receiving is not None:
            self.read_deadline = self.loop.time() + self.timeouts.body
            self._receiving.content.feed(body)

    def on_message_complete(self) -> None:
        if self._receiving is not None:
            self._receiving.content.end()
            self._receiving = None
        if self.their_state is not MUST_CLOSE:
            self.their_state = DONE
            self.read_deadline = _NEVER

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Handle the parsed requests one at a time, in order; then wait for the next, or
        close."""
        try:
            while self._queue:
                request = self._queue[0]
                response = await self._respond(request)
                if self.writing_paused:
                    await self.drain()  # whole answers too: pipelining cannot queue memory
                if response is not None:
                    self._answer(request, response)
                self._queue.popleft()
                if not request.keep_alive or self.server.closing:
                    self.our_state = MUST_CLOSE
                elif not request.content.done:
                    # An answer sent before the whole body arrived: the rest is read (and
                    # dropped) before the next request can be parsed.
                    if _drainable(request):
                        await request.content.read()
                    else:
                        self.our_state = MUST_CLOSE
                if self.our_state is MUST_CLOSE or (self._refusal and not self._queue):
                    break
                self._start_next_cycle()
            if self.our_state is MUST_CLOSE or self._refusal is not None:
                self._end()
        except (ConnectionError, Refusal, _Close, asyncio.CancelledError):
            self.close()
        finally:
            self._task = None
            self.server.check_drained()

    async def _respond(self, request: Request) -> Response | None:
        """The handler's answer; a failure of its own becomes a refusal's answer."""
        try:
            return await self.server.handler(request)
        except (asyncio.CancelledError, ConnectionError):
            # The client went away, or the handler gave up on an answer already started:
            # closing the connection is all that is left (nothing to log).
            raise
        except Refusal as refused:  # a body that the parser refused, or that stalled
            refusal = refused
        except Exception as exc:  # a bug: answer 500, keep the broker up
            log.error("handler_failed", error=repr(exc), exc_info=exc)
            refusal = Refusal(500, "the broker failed to handle this request")
        if request.started:
            raise _Close
        request.keep_alive = False
        return self.server.refusal(refusal)

    def _start_next_cycle(self) -> None:
        """Answered, the body all read, the connection kept: on to the next request."""
        self.our_state = IDLE
        if self._queue:
            self.our_state = SENDING
        elif self.their_state is DONE:
            self.their_state = IDLE
            self.read_deadline = self.loop.time() + self.timeouts.keepalive
        self.resume_reading()

    def _end(self) -> None:
        """The last answer is out (and the pending refusal, if any): close, lingering when
        the client may still be sending."""
        refusal, self._refusal = self._refusal, None
        if refusal is not None:
            response = self.server.refusal(refusal)
            headers = response.headers
            headers.append(("Connection", "close"))
            headers.append(("Content-Length", str(len(response.body))))
            headers.append(("Date", _Date.now()))
            self.write(_serialize(response.status, response.reason, headers) + response.body)
        if self.their_state in (IDLE, DONE) or self.transport is None or self.closed:
            self.close()
            return
        # Shut our side (after what is buffered), read and drop what comes, until the
        # client closes or the lingering time ends.
        self.our_state = LINGERING
        self.their_state = MUST_CLOSE
        self.read_deadline = self.loop.time() + self.timeouts.lingering
        if self.transport.can_write_eof():
            self.transport.write_eof()
        Reading.resume_reading(self)

    def _answer(self, request: Request, response: Response) -> None:
        headers = response.headers
        body = b""
        if answer_has_body(request.method, response.status):
            body = response.body
            if not _has(headers, "content-length"):
                headers.append(("Content-Length", str(len(body))))
        head = self.head(request, response.status, response.reason, headers)
        if body and len(body) <= 16 * 1024:
            self.write(head + body)
        elif body:
            self.writelines((head, body))
        else:
            self.write(head)

    def head(
        self, request: Request, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> bytes:
        if (
            not request.keep_alive
            or self.server.closing
            # The unread rest of the body cannot be skipped (see _serve): the connection
            # closes after this answer, and the client should know (RFC 9110, 10.1.1).
            or not _drainable(request)
        ):
            request.keep_alive = False
            headers.append(("Connection", "close"))
        elif request.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        if not _has(headers, "date"):
            headers.append(("Date", _Date.now()))
        return _serialize(status, reason, headers)

    def _refuse(self, refused: Refusal) -> None:
        if refused.status >= 500 and refused.status not in (501, 505):
            log.error("request_refused", status=refused.status, message=refused.message)
        else:
            log.info("request_refused", status=refused.status, message=refused.message)
        # The requests parsed whole before the refused bytes are still answered, in order,
        # then the refusal; nothing after them is parsed.
        self._refusal = refused
        self.their_state = MUST_CLOSE
        self.read_deadline = _NEVER
        self.pause_reading()
        receiving, self._receiving = self._receiving, None
        if receiving is not None:  # the refused bytes were in its body
            # Its handler, or _serve dropping the rest of it, sees the body fail.
            receiving.content.fail(refused)
            receiving.keep_alive = False
            if receiving in self._queue:
                if self._task is not None and self._queue[0] is receiving:
                    self._refusal = None  # its handler's read fails: that is its answer
                else:
                    self._queue.remove(receiving)  # not handled yet: never will be
        if self._task is None and not self._queue:
            self._end()

    # -- time ------------------------------------------------------------------------------

    def expect_body(self) -> None:
        """A reader waits for the body: the body timeout runs (from the last piece)."""
        if self.read_deadline is _NEVER and self.their_state is BODY:
            self.read_deadline = self.loop.time() + self.timeouts.body

    def check_time(self, now: float) -> None:
        """Act on a deadline passed (called by the server's sweep)."""
        if now >= self.write_deadline:
            # It reads nothing: what waits for it cannot be flushed, so close() never would.
            self.client_gone = True
            self.abort()
            return
        if now < self.read_deadline:
            return
        self.read_deadline = _NEVER
        state = self.their_state
        if self.our_state is LINGERING:
            self.abort()
        elif state is IDLE and self.our_state is IDLE:
            self.close()  # an idle keep-alive connection
        elif state is HEAD:
            self._refuse(Refusal(408, f"the request head took over {self.timeouts.header:g}s"))
        elif state is BODY and self._reading_paused:
            # Not the client's stall: reading waits for the handler (flow control).
            self.read_deadline = now + self.timeouts.body
        elif state is BODY:
            refusal = Refusal(408, f"the request body stalled for {self.timeouts.body:g}s")
            receiving, self._receiving = self._receiving, None
            self.their_state = MUST_CLOSE
            self.pause_reading()
            if receiving is not None:
                receiving.content.fail(refusal)  # its reader answers 408, or the rest is
                receiving.keep_alive = False  # not drainable: the connection closes

    # -- transport ------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, data: Iterable[bytes | memoryview]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(data)

    async def drain(self) -> None:
        while self.writing_paused and not self.closed:
            self._drain = self.loop.create_future()
            self.write_deadline = self.loop.time() + self.timeouts.write
            try:
                await self._drain
            finally:
                self._drain = None
                self.write_deadline = _NEVER
        if self.closed:
            raise ConnectionResetError("the client closed the connection")

    def resume_reading(self) -> None:
        if len(self._queue) > 1 or self.their_state is MUST_CLOSE:
            return  # a pipelined request waits, or nothing more is parsed
        super().resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.our_state = CLOSED
            if self.transport.get_write_buffer_size():
                # An answer still going out: a client that never reads it is cut off.
                self.write_deadline = self.loop.time() + self.timeouts.write
            self.transport.close()

    def abort(self) -> None:
        """Close at once with a reset: what waits to be written is dropped, by the kernel too
        (a plain close would leave it there, to a client that never reads it)."""
        self.closed = True
        self.our_state = CLOSED
        self.write_deadline = _NEVER
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._task is not None


def _has(headers: list[tuple[str, str]], lower: str) -> bool:
    """Whether ``headers`` has a field named ``lower`` (in any case); names of another length
    are not lower-cased."""
    size = len(lower)
    for name, _ in headers:
        if len(name) == size and name.lower() == lower:
            return True
    return False


def _serialize(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    """An answer's head as it goes on the wire."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _check_host(headers: CIMultiDictProxy[str], version: str) -> None:
    """One valid ``Host`` (RFC 9112, 3.2): required on HTTP/1.1, never repeated."""
    hosts = headers.getall("Host", ())
    if len(hosts) == 1:
        if not _valid_host(hosts[0]):
            raise Refusal(400, "the Host header is not a valid host")
    elif hosts:
        raise Refusal(400, "the Host header is repeated")
    elif version == "1.1":
        raise Refusal(400, "an HTTP/1.1 request needs a Host header")


@functools.lru_cache(maxsize=256)
def _valid_host(value: str) -> bool:
    return _HOST.fullmatch(value) is not None


def _check_coding(coding: str, version: str) -> None:
    """``Transfer-Encoding``: chunked alone, on HTTP/1.1 only (RFC 9112, 6.1: no length
    without chunked last, 400; a coding not understood, 501). llhttp parses ``gzip,
    chunked`` as chunked, and the proxy would forward the coded body as plain."""
    if version == "1.0":
        raise Refusal(400, "Transfer-Encoding is not allowed on an HTTP/1.0 request")
    codings = coding.lower().split(",")
    if codings[-1].strip() != "chunked":
        raise Refusal(400, "the request's Transfer-Encoding does not end with chunked")
    if len(codings) > 1:
        raise Refusal(501, "only the chunked transfer coding is supported")


def _drainable(request: Request) -> bool:
    """Whether the request's body is all read, or what is left can be read and dropped
    before the next request: its size is known and small, and the client is sending it."""
    content = request.content
    if content.done:
        return True
    length = request.content_length
    return (
        not content.failed
        and not content.expect_continue  # the client waits for 100 Continue: never sent
        and length is not None
        and length <= HIGH_WATER
    )


class Server:
    """Serve ``handler`` on one listening socket; ``refusal`` makes the answers to the
    requests the listener refuses itself."""

    def __init__(
        self,
        handler: Handler,
        *,
        refusal: RefusalAnswer = plain_refusal,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.handler = handler
        self.refusal = refusal
        self.timeouts = timeouts or Timeouts()
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.closing = False
        #: Set when, while closing, the last busy connection finished its request.
        self._drained = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def listen(self, host: str, port: int) -> int:
        """Start listening; the bound port."""
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        self._sweeper = self.loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    def check_drained(self) -> None:
        if self.closing and not any(conn.busy for conn in self.connections):
            self._drained.set()

    async def _sweep(self) -> None:
        """Act on the connections' deadlines, a few times per shortest timeout (at least
        once a second): no timer per request."""
        t = self.timeouts
        interval = min(1.0, min(t.header, t.body, t.write, t.keepalive, t.lingering) / 4)
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check_time(now)

    async def shutdown(self, grace: float) -> None:
        """Stop listening, close idle connections, let requests in flight finish (at most
        ``grace`` seconds), then close what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if any(conn.busy for conn in self.connections):
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                pass
        if self._sweeper is not None:
            self._sweeper.cancel()
        # What is left is cancelled (closing its connection would do it a loop turn later)
        # and waited for: nothing of the listener runs once shutdown returns.
        tasks = [conn._task for conn in self.connections if conn._task is not None]
        for conn in list(self.connections):
            conn.close()
        for task in tasks:
            task.cancel()
        if tasks:
            # A second at most for them to unwind: a handler that ignores cancellation must
            # not hold the broker's shutdown for ever.
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        if self._server is not None:
            await self._server.wait_closed()
