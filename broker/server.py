"""The proxy listener's HTTP/1.1 server: httptools (llhttp) over asyncio protocols.

aiohttp's server spent ~45 µs of CPU per request here against ~16 for a bare llhttp server
(bench/RESULTS.md): a request object with lazy properties, a response object prepared,
serialised and finished in several steps, and a payload writer per message. The proxy needs
none of that, so this server hands it a slim :class:`Request` and writes whole answers in one
call.

What it guarantees:

- llhttp parses strictly: conflicting ``Content-Length``/``Transfer-Encoding``, duplicate
  lengths, obs-fold, CR/LF/NUL and other control characters in headers, bare LF line ends
  and invalid header names are refused with a JSON 400 before any handler runs; a request
  line over :data:`MAX_LINE_SIZE` gets 414, a header field over :data:`MAX_FIELD_SIZE` or more
  than :data:`MAX_HEADERS` fields 431. The connection closes after each refusal.
- one request at a time per connection, in order (pipelined requests wait their turn);
- bodies stream both ways with flow control: reading from the client pauses while what it
  sent is not taken; writing waits while the client does not read;
- a client that goes away cancels its request's handler (and so its retries);
- ``Expect: 100-continue`` is answered when the handler first reads the body;
- idle keep-alive connections close after :data:`KEEPALIVE_TIMEOUT`; at shutdown the
  listener closes, idle connections close, in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import ProxyError, error_payload
from .flow import HIGH_WATER, Chunks, Reading, answer_has_body

log = structlog.get_logger("broker.listener")

#: The longest request line accepted (aiohttp's default), then 414.
MAX_LINE_SIZE = 8190
#: The longest header field (name and value) accepted, then 431.
MAX_FIELD_SIZE = 8190
#: The most header fields accepted, then 431.
MAX_HEADERS = 128
#: Idle keep-alive connections are closed after this (aiohttp's default).
KEEPALIVE_TIMEOUT = 75.0
#: At shutdown, how long handlers cancelled after the grace period get to unwind.
CANCEL_GRACE = 1.0

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


class _Refused(Exception):
    """A request the parser or a limit refused: answered with ``status`` and closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
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


def json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return Response(status, [("Content-Type", "application/json"), *headers], orjson.dumps(payload))


class BodyReader:
    """The request body as it arrives (``readany``), with flow control towards the client."""

    __slots__ = ("_chunks", "_conn", "_done", "_error", "_waiter", "expect_continue")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks = Chunks(conn)
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: The client waits for ``100 Continue`` before it sends the body.
        self.expect_continue = False

    async def readany(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            if self._chunks:
                return bytes(self._chunks.take())
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            if self.expect_continue:
                self.expect_continue = False
                self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._conn.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
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
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._wake()

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
    ) -> None:
        self._conn = conn
        self.method = method
        #: The request target as sent: path and query, still encoded.
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body_exists = body_exists
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
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

    async def read(self) -> bytes:
        return await self.content.read()

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
        if chunked:
            conn.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            conn.write(chunk)
        if conn.writing_paused:
            await conn.drain()

    def write_eof(self, chunked: bool) -> None:
        if chunked:
            self._conn.write(b"0\r\n\r\n")


Handler = Callable[[Request], Awaitable[Response | None]]


class _Connection(Reading, asyncio.Protocol):
    """One client connection: requests parsed, handled one at a time, answered in order."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        #: Requests parsed and not yet answered; the first is being handled.
        self._queue: collections.deque[Request] = collections.deque()
        #: The request whose body is being parsed (the last of the queue, or none).
        self._receiving: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[str, str]] = []
        self._upgraded = False
        #: What the parser refused: answered once the requests parsed before it are.
        self._refusal: _Refused | None = None
        #: Whether a parser callback ran during the current read, and the bytes of the reads
        #: since one last did (see data_received).
        self._progress = False
        self._stalled = 0
        self.idle_since = self.loop.time()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self._refusal is not None:
            # Bytes after a CONNECT or an Upgrade request, or after a refused one: never
            # parsed, never sent.
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or Upgrade: the request itself is answered (CONNECT is refused by the
            # proxy; an Upgrade header is hop-by-hop and dropped), then the connection closes.
            self._upgraded = True
            for request in self._queue:
                request.keep_alive = False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause)
            else:
                self._refuse(_Refused(400, "bad_request", "malformed HTTP request"))
        except httptools.HttpParserError as exc:
            first = str(exc).split(":", 1)[0][:80]
            self._refuse(_Refused(400, "bad_request", f"malformed HTTP request ({first})"))
        else:
            # httptools gathers a header field whole before on_header sees it (and checks
            # its size): reads in which no callback ran count towards the field being
            # gathered, so that one that never ends is refused rather than kept. Reads do not
            # split on field bounds: twice the limit leaves room for a field's first read.
            if self._progress:
                self._progress = False
                self._stalled = 0
            else:
                self._stalled += len(data)
                if self._stalled > 2 * MAX_FIELD_SIZE:
                    self._refuse(
                        _Refused(
                            431,
                            "header_too_large",
                            f"a header field is longer than {MAX_FIELD_SIZE} bytes",
                        )
                    )
        if self._task is None and self._queue:
            self._task = self.loop.create_task(self._serve())

    def eof_received(self) -> bool | None:
        # A client that closes its side is gone (as aiohttp and nginx take it): the
        # transport closes, connection_lost cancels what it asked for.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
        self._progress = True
        self._url = []
        self._url_size = 0
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._progress = True
        self._url_size += len(url)
        if self._url_size > MAX_LINE_SIZE:
            raise _Refused(
                414, "uri_too_long", f"the request line is longer than {MAX_LINE_SIZE} bytes"
            )
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._progress = True
        if len(name) + len(value) > MAX_FIELD_SIZE:
            raise _Refused(
                431, "header_too_large", f"a header field is longer than {MAX_FIELD_SIZE} bytes"
            )
        if len(self._headers) >= MAX_HEADERS:
            raise _Refused(431, "header_too_large", "too many header fields")
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        self._progress = True
        parser = self.parser
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        length = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers
        request = Request(
            self,
            parser.get_method().decode("ascii", "replace"),
            b"".join(self._url).decode("utf-8", "surrogateescape"),
            parser.get_http_version(),
            headers,
            parser.should_keep_alive(),
            chunked or (length is not None and length != "0"),
        )
        if request.body_exists and request.version == "1.1":
            expect = headers.get("Expect")
            request.content.expect_continue = (
                expect is not None and expect.lower() == "100-continue"
            )
        self._queue.append(request)
        self._receiving = request
        if len(self._queue) > 1:
            self.pause_reading()  # pipelined: one at a time

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._receiving is not None:
            self._receiving.content.feed(body)

    def on_message_complete(self) -> None:
        self._progress = True
        if self._receiving is not None:
            self._receiving.content.end()
            self._receiving = None

    # -- serving ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        handler = self.server.handler
        try:
            while self._queue and not self.closed:
                request = self._queue[0]
                try:
                    response = await handler(request)
                except asyncio.CancelledError:
                    raise
                except ConnectionError:
                    # The client went away, or the handler gave up on an answer already
                    # started: closing the connection is all that is left (nothing to log).
                    self.close()
                    return
                except _Refused as refused:  # the parser refused the body the handler read
                    if request.started:
                        self.close()
                        return
                    request.keep_alive = False
                    response = _error(refused.status, refused.code, refused.message)
                except Exception as exc:  # a bug: answer 500, keep the broker up
                    log.error("handler_failed", error=repr(exc), exc_info=exc)
                    if request.started:
                        self.close()
                        return
                    request.keep_alive = False
                    response = _error(
                        500, "internal_error", "the broker failed to handle this request"
                    )
                if response is not None:
                    self._answer(request, response)
                elif self.writing_paused:
                    await self.drain()
                self._queue.popleft()
                if self.closed:
                    return
                if not request.keep_alive or self.server.closing:
                    self.close()
                    return
                # An answer sent before the whole body arrived: the rest must be read (and
                # dropped) before the next request can be parsed.
                if not request.content._done:
                    if not _drainable(request):
                        self.close()
                        return
                    await request.content.read()
                if self._refusal is not None and not self._queue:
                    self._send_refusal(self._refusal)  # the requests before it are answered
                    return
                self.resume_reading()
            self.idle_since = self.loop.time()
        except (ConnectionError, _Refused, asyncio.CancelledError):
            self.close()
        finally:
            self._task = None
            if self._queue and not self.closed:  # parsed while the last one finished
                self._task = self.loop.create_task(self._serve())
            self.server.check_drained()

    def _answer(self, request: Request, response: Response) -> None:
        headers = response.headers
        body = b""
        if answer_has_body(request.method, response.status):
            body = response.body
            if not any(name.lower() == "content-length" for name, _ in headers):
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
            or self._upgraded
            # The unread rest of the body cannot be skipped (see _serve): the connection
            # closes after this answer, and the client should know (RFC 9110, 10.1.1).
            or not _drainable(request)
        ):
            request.keep_alive = False
            headers.append(("Connection", "close"))
        elif request.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        if not any(name.lower() == "date" for name, _ in headers):
            headers.append(("Date", _Date.now()))
        return _serialize(status, reason, headers)

    def _refuse(self, refused: _Refused) -> None:
        if refused.status >= 500:
            log.error("request_refused", status=refused.status, code=refused.code)
        else:
            log.info(
                "request_refused", status=refused.status, code=refused.code, message=refused.message
            )
        # The requests parsed whole before the refused bytes are still answered, in order,
        # then the refusal; nothing after them is read.
        self._refusal = refused
        self.pause_reading()
        receiving, self._receiving = self._receiving, None
        if receiving is not None:  # the refused bytes were in its body
            # Its handler, or _serve dropping the rest of it, sees the body fail.
            receiving.content.fail(refused)
            if receiving in self._queue and (self._task is None or self._queue[0] is not receiving):
                self._queue.remove(receiving)  # not handled yet: never will be
        if self._task is None and not self._queue:
            self._send_refusal(refused)

    def _send_refusal(self, refused: _Refused) -> None:
        response = _error(refused.status, refused.code, refused.message)
        response.headers.append(("Connection", "close"))
        response.headers.append(("Content-Length", str(len(response.body))))
        response.headers.append(("Date", _Date.now()))
        self.write(_serialize(response.status, response.reason, response.headers) + response.body)
        self.close()

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
            try:
                await self._drain
            finally:
                self._drain = None
        if self.closed:
            raise ConnectionResetError("the client closed the connection")

    def resume_reading(self) -> None:
        if len(self._queue) > 1:
            return  # a pipelined request waits: read no more until it is answered
        super().resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._task is not None


def _serialize(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    """An answer's head as it goes on the wire."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _drainable(request: Request) -> bool:
    """Whether the request's body is all read, or what is left can be read and dropped
    before the next request: its size is known and small, and the client is sending it."""
    content = request.content
    if content._done:
        return True
    length = request.content_length
    return (
        content._error is None
        and not content.expect_continue  # the client waits for 100 Continue: never sent
        and length is not None
        and length <= HIGH_WATER
    )


def _error(status: int, code: str, message: str) -> Response:
    return json_response(status, error_payload(code, message), [("X-Broker-Error", code)])


def error_answer(error: ProxyError) -> Response:
    """A broker error as the proxy listener answers it."""
    return json_response(
        error.status,
        error_payload(error.code, error.message, error.connector),
        [("X-Broker-Error", error.code)],
    )


class Server:
    """Serve ``handler`` on one listening socket."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
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
        self._sweeper = self.loop.create_task(self._sweep_idle())
        return int(self._server.sockets[0].getsockname()[1])

    def check_drained(self) -> None:
        if self.closing and not any(conn.busy for conn in self.connections):
            self._drained.set()

    async def _sweep_idle(self) -> None:
        """Close keep-alive connections idle for longer than KEEPALIVE_TIMEOUT."""
        while True:
            await asyncio.sleep(KEEPALIVE_TIMEOUT / 4)
            now = self.loop.time()
            for conn in list(self.connections):
                if not conn.busy and now - conn.idle_since > KEEPALIVE_TIMEOUT:
                    conn.close()

    async def shutdown(self, grace: float) -> None:
        """Stop listening, close idle connections, let requests in flight finish (at most
        ``grace`` seconds), then close what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        if any(conn.busy for conn in self.connections):
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                pass
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
