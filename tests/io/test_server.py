"""broker.server on loopback: the bytes that come back for the bytes sent, the connections
that are kept, paused, refused or closed, and the handlers that run, wait or are cancelled.

Each test starts a :class:`Server` with a small handler of its own and talks to it over a real
socket in raw bytes, so the framing both ways is the test's to choose and to check. The client
reads with ``loop.sock_recv``: bytes the server sent before a reset are still read (a
``StreamReader`` would raise the reset first). Nothing waits on the clock: the tests wait on
the events they need (only the timeouts under test are waited out), and each one runs under
``asyncio.timeout(LIMIT)`` so a hang fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from broker.answers import refusal_answer
from broker.flow import HIGH_WATER
from broker.server import (
    MAX_FIELD_SIZE,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    BodyReader,
    Request,
    Response,
    Server,
    Timeouts,
    _Connection,
)

#: The bound on every test, teardown included.
LIMIT = 5.0
#: The most one socket read hands a protocol (asyncio's and uvloop's read size).
MAX_READ = 256 * 1024

Handler = Callable[[Request], Awaitable[Response | None]]


# -- a raw client --------------------------------------------------------------------------------


@dataclass
class Answer:
    """One response as it came: status line, headers in order, the body decoded and as framed."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    #: The body as on the wire (chunk framing included).
    wire: bytes = b""

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.getall(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self) -> Any:
        assert self.get("Content-Type") == "application/json"
        return orjson.loads(self.body)


class Client:
    """One connection to the server under test: bytes out, responses parsed as they come."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    async def _fill(self) -> bool:
        """Read more into the buffer; False at the end (a reset ends it too)."""
        try:
            data = await self.loop.sock_recv(self.sock, MAX_READ)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_until(self, separator: bytes) -> bytes:
        while (index := self.buffer.find(separator)) < 0:
            if not await self._fill():
                raise EOFError(f"closed before {separator!r}: {bytes(self.buffer)[:200]!r}")
        return self._take(index + len(separator))

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill():
                raise EOFError(f"closed after {len(self.buffer)} of {size} bytes")
        return self._take(size)

    async def rest(self) -> bytes:
        """Whatever the server sends until it closes the connection (b"" for a clean close)."""
        while await self._fill():
            pass
        return self._take(len(self.buffer))

    async def response(self, method: str = "GET") -> Answer:
        head = await self.read_until(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers = [
            (name, value.strip()) for name, _, value in (line.partition(":") for line in lines)
        ]
        answer = Answer(int(status), reason, headers, head)
        if method == "HEAD" or answer.status in (204, 304) or answer.status < 200:
            return answer
        if (coding := answer.get("Transfer-Encoding")) is not None:
            assert coding == "chunked"
            while True:
                size_line = await self.read_until(b"\r\n")
                size = int(size_line, 16)
                data = await self.read_exactly(size + 2)
                assert data.endswith(b"\r\n")
                answer.wire += size_line + data
                if size == 0:
                    break
                answer.body += data[:-2]
        elif (length := answer.get("Content-Length")) is not None:
            answer.body = answer.wire = await self.read_exactly(int(length))
        else:
            answer.body = answer.wire = await self.rest()
        return answer


@dataclass
class Served:
    server: Server
    port: int
    clients: list[Client] = field(default_factory=list)

    async def connect(self) -> Client:
        client = await Client.connect(self.port)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, *, grace: float = 1.0, timeouts: Timeouts | None = None
) -> AsyncIterator[Served]:
    """``handler`` served on a loopback port; the server shut down (``grace``) on the way out."""
    server = Server(handler, refusal=refusal_answer, timeouts=timeouts)
    served = Served(server, await server.listen("127.0.0.1", 0))
    try:
        yield served
    finally:
        await server.shutdown(grace)
        for client in served.clients:
            client.close()


class Reads:
    """The bytes the server's connections have read, to wait until the server has seen
    what was sent (patched into ``_Connection.data_received``)."""

    def __init__(self) -> None:
        self.total = 0
        self._changed = asyncio.Event()

    def add(self, size: int) -> None:
        self.total += size
        self._changed.set()

    async def reach(self, total: int) -> None:
        while self.total < total:
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    counter = Reads()
    data_received = _Connection.data_received

    def counting(self: _Connection, data: bytes) -> None:
        data_received(self, data)
        counter.add(len(data))

    monkeypatch.setattr(_Connection, "data_received", counting)
    return counter


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (the test's timeout bounds the wait)."""
    while not condition():
        await asyncio.sleep(0)


def get(target: str = "/", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + target.encode() + b" HTTP/" + version + b"\r\nHost: x\r\n" + extra + b"\r\n"


async def echo_path(request: Request) -> Response:
    return Response(200, [("Content-Type", "text/plain")], request.raw_path.encode())


async def echo_body(request: Request) -> Response:
    body = await request.read()
    return Response(200, [("X-Path", request.raw_path)], body)


def assert_refused(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status
    assert answer.get("X-Broker-Error") == code
    assert answer.get("Connection") == "close"
    assert answer.json()["error"]["code"] == code


async def refused_unhandled(request_bytes: bytes, status: int, code: str) -> None:
    """``request_bytes`` get the JSON refusal ``status``/``code`` and the connection closes;
    the handler never runs."""
    calls: list[Request] = []

    async def handle(request: Request) -> Response:
        calls.append(request)
        return Response(200)

    async with asyncio.timeout(LIMIT), serving(handle) as served:
        client = await served.connect()
        await client.send(request_bytes)
        assert_refused(await client.response(), status, code)
        assert await client.rest() == b""
    assert calls == []


# -- keep-alive ----------------------------------------------------------------------------------


class TestKeepAlive:
    """HTTP/1.1 connections are kept unless a side says close; HTTP/1.0 ones only on request."""

    async def test_requests_on_one_connection_in_order(self) -> None:
        """Two requests one after the other on one connection, each answered in turn, with
        no ``Connection`` header (keep-alive is HTTP/1.1's default)."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            client = await served.connect()
            for target in ("/one", "/two"):
                await client.send(get(target))
                answer = await client.response()
                assert (answer.status, answer.body) == (200, target.encode())
                assert answer.get("Connection") is None

    async def test_connection_close_is_honoured(self) -> None:
        """``Connection: close``: the answer says close and the server closes the socket."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            client = await served.connect()
            await client.send(get("/bye", b"Connection: close\r\n"))
            answer = await client.response()
            assert answer.body == b"/bye"
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""

    async def test_http10_closes_by_default(self) -> None:
        """HTTP/1.0 without keep-alive: answered with ``Connection: close``, then closed."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            client = await served.connect()
            await client.send(get("/old", version=b"1.0"))
            answer = await client.response()
            assert answer.body == b"/old"
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""

    async def test_http10_keep_alive_is_kept(self) -> None:
        """HTTP/1.0 with ``Connection: keep-alive``: the answer says keep-alive and the
        connection takes the next request."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            client = await served.connect()
            await client.send(get("/1", b"Connection: keep-alive\r\n", version=b"1.0"))
            answer = await client.response()
            assert answer.body == b"/1"
            assert answer.get("Connection") == "keep-alive"
            await client.send(get("/2", version=b"1.0"))
            answer = await client.response()
            assert answer.body == b"/2"
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""

    async def test_aiohttp_client_reuses_the_connection(self) -> None:
        """A real client's requests (whole and streamed answers) all ride one connection."""
        peers: list[Any] = []

        async def handle(request: Request) -> Response | None:
            peers.append(request._conn.transport.get_extra_info("peername"))  # type: ignore[union-attr]
            if request.path == "/stream":
                chunked = request.start(200, "OK", [], length=None)
                for piece in (b"ab", b"cd"):
                    await request.write(piece, chunked)
                request.write_eof(chunked)
                return None
            return await echo_path(request)

        async with (
            asyncio.timeout(LIMIT),
            serving(handle) as served,
            aiohttp.ClientSession() as session,
        ):
            for target in ("/a", "/stream", "/b", "/stream"):
                async with session.get(f"http://127.0.0.1:{served.port}{target}") as response:
                    body = await response.read()
                assert body == (b"abcd" if target == "/stream" else target.encode())
        assert len(peers) == 4 and len(set(peers)) == 1


# -- pipelining ----------------------------------------------------------------------------------


class TestPipelining:
    @pytest.mark.parametrize("count", [2, 3])
    async def test_one_at_a_time_in_order(self, count: int) -> None:
        """Requests sent in one write are handled one at a time: a handler starts only once
        the one before it has answered, and the answers come back in order."""
        log: list[str] = []
        started = [asyncio.Event() for _ in range(count)]
        release = [asyncio.Event() for _ in range(count)]

        async def handle(request: Request) -> Response:
            n = int(request.raw_path[1:])
            log.append(f"start {n}")
            started[n].set()
            await release[n].wait()
            log.append(f"finish {n}")
            return Response(200, body=b"answer %d" % n)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"".join(get(f"/{n}") for n in range(count)))
            for n in range(count):
                await started[n].wait()
                done = [entry for k in range(n) for entry in (f"start {k}", f"finish {k}")]
                assert log == [*done, f"start {n}"]
                release[n].set()
                answer = await client.response()
                assert answer.body == b"answer %d" % n
            assert log == [entry for k in range(count) for entry in (f"start {k}", f"finish {k}")]


# -- request bodies ------------------------------------------------------------------------------


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


class TestRequestBody:
    @pytest.mark.parametrize("reading", ["read", "readany"])
    @pytest.mark.parametrize(
        ("framing", "body"),
        [
            (b"Content-Length: 11\r\n", b"hello world"),
            (b"Transfer-Encoding: chunked\r\n", chunked(b"hello", b" ", b"world")),
        ],
        ids=["content-length", "chunked"],
    )
    async def test_read_whole(self, reading: str, framing: bytes, body: bytes) -> None:
        """A Content-Length or chunked body is read whole by ``read()`` or by ``readany()``
        until b""; the next request on the connection is parsed after it."""

        async def handle(request: Request) -> Response:
            if reading == "read":
                data = await request.read()
            else:
                pieces = []
                while piece := await request.content.readany():
                    pieces.append(piece)
                data = b"".join(pieces)
                assert await request.content.readany() == b""  # and again at the end
            return Response(200, body=data)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + body + get())
            assert (await client.response()).body == b"hello world"
            assert (await client.response()).body == b""

    async def test_pieces_as_they_arrive(self) -> None:
        """``readany()`` hands each piece over as it comes, before the rest is sent."""
        pieces: asyncio.Queue[bytes] = asyncio.Queue()

        async def handle(request: Request) -> Response:
            while piece := await request.content.readany():
                pieces.put_nowait(piece)
            return Response(200, body=b"done")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in (b"first", b"second"):
                await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                assert await pieces.get() == piece
            await client.send(b"0\r\n\r\n")
            assert (await client.response()).body == b"done"

    async def test_large_body_pauses_reading(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """8 MiB sent to a handler that waits before reading: reading from the client pauses
        once HIGH_WATER is buffered (at most one read more), and resumes as the handler reads;
        the body arrives whole."""
        body = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)
        buffered: list[int] = []
        paused = asyncio.Event()
        feed = BodyReader.feed

        def recording_feed(self: BodyReader, chunk: bytes) -> None:
            feed(self, chunk)
            buffered.append(self._chunks.size)
            if not self._conn.transport.is_reading():  # type: ignore[union-attr]
                paused.set()

        monkeypatch.setattr(BodyReader, "feed", recording_feed)

        async def handle(request: Request) -> Response:
            await paused.wait()
            assert not request._conn.transport.is_reading()  # type: ignore[union-attr]
            digest = hashlib.sha256()
            size = 0
            while piece := await request.content.readany():
                digest.update(piece)
                size += len(piece)
                await asyncio.sleep(0)  # a slow reader: the client keeps sending meanwhile
            return Response(200, body=b"%d %s" % (size, digest.hexdigest().encode()))

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            answer = await client.response()
        assert answer.body == b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
        assert paused.is_set()
        assert max(buffered) <= HIGH_WATER + MAX_READ

    async def test_continue_when_the_handler_reads(self) -> None:
        """``Expect: 100-continue``: ``100 Continue`` goes out when the handler first reads;
        a client that waits for it then sends the body, which the handler gets whole."""
        started = asyncio.Event()
        go = asyncio.Event()

        async def handle(request: Request) -> Response:
            started.set()
            await go.wait()
            return Response(200, body=(await request.read())[::-1])

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            await started.wait()
            go.set()
            assert await client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            await client.send(b"hello")
            answer = await client.response()
            assert (answer.status, answer.body) == (200, b"olleh")
            assert answer.get("Connection") is None
            await client.send(get("/next"))  # the connection is kept
            assert (await client.response()).status == 200

    async def test_no_continue_without_reading(self) -> None:
        """A handler that answers ``Expect: 100-continue`` without reading: no ``100
        Continue``, the answer says close, and the connection closes (the body was never
        sent, so it cannot be skipped)."""

        async def handle(request: Request) -> Response:
            return Response(413, body=b"too big")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            answer = await client.response()
            assert (answer.status, answer.body) == (413, b"too big")
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""


class TestEarlyAnswer:
    """An answer sent before the request body was all read."""

    async def test_small_rest_is_drained(self) -> None:
        """The rest of a small body is read and dropped, and the connection takes the next
        request (the rest is never parsed as one)."""
        seen: list[str] = []

        async def handle(request: Request) -> Response:
            seen.append(request.raw_path)
            first = await request.content.readany()
            return Response(200, body=first)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            answer = await client.response()
            assert answer.body == b"abc"
            assert answer.get("Connection") is None
            await client.send(b"defghij" + get("/2"))
            answer = await client.response()
            assert (answer.status, answer.body) == (200, b"")
        assert seen == ["/1", "/2"]

    @pytest.mark.parametrize(
        ("framing", "sent"),
        [
            (b"Content-Length: %d\r\n" % (HIGH_WATER + 1), b"a" * 100),
            (b"Transfer-Encoding: chunked\r\n", b"64\r\n" + b"a" * 100 + b"\r\n"),
        ],
        ids=["over-high-water", "chunked"],
    )
    async def test_large_or_unknown_rest_closes(self, framing: bytes, sent: bytes) -> None:
        """A rest larger than HIGH_WATER (or of unknown size) is not read: the answer says
        close and the connection closes."""

        async def handle(request: Request) -> Response:
            first = await request.content.readany()
            return Response(200, body=b"%d" % len(first))

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + sent)
            answer = await client.response()
            assert answer.body == b"100"
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""


# -- responses -----------------------------------------------------------------------------------


class TestResponse:
    async def test_length_and_date_added(self) -> None:
        """A whole answer goes out with its headers as given (repeats and case kept), then a
        Content-Length and a Date added."""

        async def handle(request: Request) -> Response:
            return Response(201, [("X-A", "1"), ("x-a", "2")], b"made")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            before = time.time()
            await client.send(get())
            answer = await client.response()
        status_line, *lines = answer.head.decode().split("\r\n")[:-2]
        assert status_line == "HTTP/1.1 201 Created"
        assert lines[:3] == ["X-A: 1", "x-a: 2", "Content-Length: 4"]
        assert lines[3].startswith("Date: ") and len(lines) == 4
        date = email.utils.parsedate_to_datetime(lines[3][6:]).timestamp()
        assert before - 1 <= date <= time.time()
        assert answer.body == b"made"

    async def test_given_length_and_date_are_kept(self) -> None:
        """A handler's own Content-Length and Date are not added again."""
        date = "Sun, 06 Nov 1994 08:49:37 GMT"

        async def handle(request: Request) -> Response:
            return Response(200, [("content-length", "4"), ("date", date)], b"body", reason="Fine")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            answer = await client.response()
        assert (
            answer.head
            == b"HTTP/1.1 200 Fine\r\ncontent-length: 4\r\ndate: %s\r\n\r\n" % date.encode()
        )
        assert answer.body == b"body"

    async def test_head_keeps_length_without_body(self) -> None:
        """HEAD: the handler's Content-Length goes out, its body does not (the next answer
        on the connection starts right after the head)."""

        async def handle(request: Request) -> Response:
            if request.method == "HEAD":
                return Response(200, [("Content-Length", "42")], b"x" * 42)
            return Response(200, body=b"next")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await client.response("HEAD")
            assert answer.get("Content-Length") == "42"
            await client.send(get())
            assert (await client.response()).body == b"next"

    @pytest.mark.parametrize("status", [204, 304])
    async def test_no_body_statuses(self, status: int) -> None:
        """204 and 304 go out without a body and without an added Content-Length."""

        async def handle(request: Request) -> Response:
            if request.path == "/next":
                return Response(200, body=b"next")
            return Response(status, [("ETag", '"1"')], b"dropped")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            answer = await client.response()
            assert answer.status == status
            assert answer.get("Content-Length") is None
            await client.send(get("/next"))
            assert (await client.response()).body == b"next"

    async def test_streamed_chunked_on_http11(self) -> None:
        """``start(length=None)`` on HTTP/1.1: chunked, each write one chunk (an empty write
        none: it would end the body), then the terminator; the connection is kept."""

        async def handle(request: Request) -> Response | None:
            if request.path == "/next":
                return Response(200, body=b"next")
            chunked = request.start(200, "OK", [("X-S", "1")], length=None)
            assert chunked
            await request.write(b"hello", chunked)
            await request.write(b"", chunked)
            await request.write(memoryview(b"x" * 300), chunked)
            request.write_eof(chunked)
            return None

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            answer = await client.response()
            assert answer.headers[:2] == [("X-S", "1"), ("Transfer-Encoding", "chunked")]
            assert answer.get("Content-Length") is None
            assert answer.wire == b"5\r\nhello\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"
            await client.send(get("/next"))
            assert (await client.response()).body == b"next"

    async def test_streamed_on_http10_closes(self) -> None:
        """``start(length=None)`` on HTTP/1.0 (even keep-alive): no chunking, the body ends
        when the connection closes, and the head says so."""

        async def handle(request: Request) -> None:
            chunked = request.start(200, "OK", [], length=None)
            assert not chunked
            for piece in (b"one ", b"two"):
                await request.write(piece, chunked)
            request.write_eof(chunked)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get("/", b"Connection: keep-alive\r\n", version=b"1.0"))
            answer = await client.response()
            assert answer.get("Connection") == "close"
            assert answer.get("Transfer-Encoding") is None and answer.get("Content-Length") is None
            assert answer.body == b"one two"

    async def test_streamed_with_length_is_plain(self) -> None:
        """``start(length=n)``: the body goes out as written, unframed; the connection is kept."""

        async def handle(request: Request) -> Response | None:
            if request.path == "/next":
                return Response(200, body=b"next")
            chunked = request.start(200, "OK", [("Content-Length", "10")], length=10)
            assert not chunked
            for piece in (b"01234", b"56789"):
                await request.write(piece, chunked)
            request.write_eof(chunked)
            return None

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            answer = await client.response()
            assert answer.get("Transfer-Encoding") is None
            assert answer.wire == b"0123456789"
            await client.send(get("/next"))
            assert (await client.response()).body == b"next"

    async def test_streaming_waits_for_a_slow_reader(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """16 MiB written to a client that does not read yet: ``write`` waits before writing
        while the transport is over its high-water mark, so it never holds more than that
        and one piece; the body arrives whole."""
        piece = b"0123456789abcdef" * 8 * 1024  # 128 KiB
        count = 128
        held: list[int] = []
        limits: list[int] = []
        paused = asyncio.Event()
        pause_writing = _Connection.pause_writing

        def recording_pause(self: _Connection) -> None:
            pause_writing(self)
            paused.set()

        monkeypatch.setattr(_Connection, "pause_writing", recording_pause)

        async def handle(request: Request) -> None:
            transport = request._conn.transport
            assert transport is not None
            limits.append(transport.get_write_buffer_limits()[1])
            chunked = request.start(
                200, "OK", [("Content-Length", str(len(piece) * count))], length=len(piece) * count
            )
            for _ in range(count):
                await request.write(piece, chunked)
                held.append(transport.get_write_buffer_size())
            request.write_eof(chunked)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            await paused.wait()
            answer = await client.response()
        assert answer.body == piece * count
        assert max(held) <= limits[0] + len(piece)  # drained before each write


# -- errors --------------------------------------------------------------------------------------


class TestErrors:
    async def test_handler_failure_is_500(self) -> None:
        """A handler that raises: JSON 500 ``internal_error``, the connection closed; other
        connections are served as before."""

        async def handle(request: Request) -> Response:
            if request.path == "/boom":
                raise RuntimeError("boom")
            return await echo_path(request)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get("/boom"))
            answer = await client.response()
            assert_refused(answer, 500, "internal_error")
            assert "boom" not in answer.body.decode()
            assert await client.rest() == b""
            other = await served.connect()
            await other.send(get("/fine"))
            assert (await other.response()).body == b"/fine"

    async def test_failure_after_start_truncates(self) -> None:
        """A handler that raises after ``start()``: the connection closes, so the client sees
        a cut-off body (no terminator), never a second answer."""

        async def handle(request: Request) -> None:
            chunked = request.start(200, "OK", [], length=None)
            await request.write(b"partial", chunked)
            raise RuntimeError("boom")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            head = await client.read_until(b"\r\n\r\n")
            assert (
                head.startswith(b"HTTP/1.1 200 OK\r\n")
                and b"Transfer-Encoding: chunked\r\n" in head
            )
            assert await client.rest() == b"7\r\npartial\r\n"

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ],
        ids=[
            "cl+te",
            "two-cl",
            "bare-lf",
            "control-char",
            "bare-cr",
            "space-in-name",
            "obs-fold",
            "bad-chunk-size",
        ],
    )
    async def test_parser_refusal_is_400(self, request_bytes: bytes) -> None:
        """What llhttp refuses gets a JSON 400 with ``Connection: close``, the connection
        closes, and the handler never runs."""
        await refused_unhandled(request_bytes, 400, "bad_request")

    @pytest.mark.parametrize(
        ("request_bytes", "status", "code"),
        [
            (get("/" + "a" * (MAX_LINE_SIZE - 1)), 200, None),
            (get("/" + "a" * MAX_LINE_SIZE), 414, "uri_too_long"),
            (get("/", b"X-Big: " + b"b" * (MAX_FIELD_SIZE - 5) + b"\r\n"), 200, None),
            (get("/", b"X-Big: " + b"b" * (MAX_FIELD_SIZE - 4) + b"\r\n"), 431, "header_too_large"),
            (get("/", b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_HEADERS - 1))), 200, None),
            (
                get("/", b"".join(b"X-%d: 1\r\n" % n for n in range(MAX_HEADERS))),
                431,
                "header_too_large",
            ),
        ],
        ids=[
            "line-at-limit",
            "line-over",
            "field-at-limit",
            "field-over",
            "fields-at-limit",
            "fields-over",
        ],
    )
    async def test_size_limits(self, request_bytes: bytes, status: int, code: str | None) -> None:
        """A request target over MAX_LINE_SIZE gets 414, a field (name and value) over
        MAX_FIELD_SIZE or more than MAX_HEADERS fields 431, the handler never running; at
        the limits the request is served."""
        calls: list[Request] = []

        async def handle(request: Request) -> Response:
            calls.append(request)
            return Response(200)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(request_bytes)
            answer = await client.response()
            if code is None:
                assert answer.status == 200 and len(calls) == 1
            else:
                assert_refused(answer, status, code)
                assert await client.rest() == b""
                assert calls == []

    async def test_unending_field_is_431(self, reads: Reads) -> None:
        """A header field that never ends is refused once the head is over MAX_HEAD_SIZE, not
        gathered in memory for ever."""

        async def handle(request: Request) -> Response:
            raise AssertionError("never handled")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
            await client.send(start)
            await reads.reach(len(start))  # the field has begun
            await client.send(b"b" * (MAX_HEAD_SIZE + 1))
            assert_refused(await client.response(), 431, "header_too_large")
            assert await client.rest() == b""

    async def test_refused_second_of_two_pipelined(self) -> None:
        """A good request and a refused one in one write: the first is answered, then the
        refusal, then the connection closes."""
        calls: list[str] = []

        async def handle(request: Request) -> Response:
            calls.append(request.raw_path)
            return await echo_path(request)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get("/1") + b"GET /2 HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")
            answer = await client.response()
            assert (answer.status, answer.body) == (200, b"/1")
            assert answer.get("Connection") is None  # a "close" here would forbid the refusal
            assert_refused(await client.response(), 400, "bad_request")
            assert await client.rest() == b""
        assert calls == ["/1"]

    async def test_refused_while_one_is_in_flight(self, reads: Reads) -> None:
        """A refused request arriving while the one before it is being handled: that one is
        still answered, then the refusal, then the connection closes."""
        started = asyncio.Event()
        release = asyncio.Event()

        async def handle(request: Request) -> Response:
            started.set()
            await release.wait()
            return await echo_path(request)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            first, refused = get("/1"), b"GET /" + b"a" * MAX_LINE_SIZE + b" HTTP/1.1\r\n\r\n"
            await client.send(first)
            await started.wait()
            await client.send(refused)
            await reads.reach(len(first) + len(refused))  # refused while /1 is in flight
            release.set()
            assert (await client.response()).body == b"/1"
            assert_refused(await client.response(), 414, "uri_too_long")
            assert await client.rest() == b""

    async def test_malformed_body_in_flight(self) -> None:
        """A chunked body the parser refuses while its handler reads it: the read fails, the
        refusal is the answer, the connection closes."""
        started = asyncio.Event()
        failures: list[BaseException] = []

        async def handle(request: Request) -> Response:
            started.set()
            try:
                await request.read()
            except Exception as exc:
                failures.append(exc)
                raise
            return Response(200)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            await started.wait()
            await client.send(b"zz\r\n")
            assert_refused(await client.response(), 400, "bad_request")
            assert await client.rest() == b""
        assert len(failures) == 1


# -- a client that goes away ---------------------------------------------------------------------


class TestDisconnect:
    @pytest.mark.parametrize("how", ["close", "half-close"])
    async def test_handler_is_cancelled(self, how: str) -> None:
        """Closing the socket (or only its sending side) while the handler waits cancels
        the handler."""
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def handle(request: Request) -> Response:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response(200)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            await started.wait()
            if how == "close":
                client.close()
            else:
                client.half_close()
            await cancelled.wait()
            await until(lambda: not served.server.connections)


# -- CONNECT and Upgrade -------------------------------------------------------------------------


class TestUpgrade:
    @pytest.mark.parametrize(
        ("head", "method", "target", "header"),
        [
            (
                b"CONNECT erp.example:443 HTTP/1.1\r\nHost: erp.example:443\r\n\r\n",
                "CONNECT",
                "erp.example:443",
                ("Host", "erp.example:443"),
            ),
            (
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                "GET",
                "/ws",
                ("Upgrade", "websocket"),
            ),
        ],
        ids=["connect", "upgrade"],
    )
    async def test_answered_then_closed(
        self, head: bytes, method: str, target: str, header: tuple[str, str]
    ) -> None:
        """The handler sees the request; its answer says close; bytes after the head (in the
        same write or later) are never parsed as a request; the connection closes."""
        seen: list[tuple[str, str, str | None]] = []
        started = asyncio.Event()
        release = asyncio.Event()

        async def handle(request: Request) -> Response:
            seen.append((request.method, request.raw_path, request.headers.get(header[0])))
            started.set()
            await release.wait()
            return Response(400, body=b"refused")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(head + get("/smuggled-1"))
            await started.wait()
            await client.send(get("/smuggled-2"))
            release.set()
            answer = await client.response()
            assert (answer.status, answer.body) == (400, b"refused")
            assert answer.get("Connection") == "close"
            assert await client.rest() == b""
        assert seen == [(method, target, header[1])]


# -- shutdown ------------------------------------------------------------------------------------


class TestShutdown:
    async def test_idle_connections_close_at_once(self) -> None:
        """Idle keep-alive connections (and ones that sent nothing) close at once: shutdown
        does not wait for its grace period."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            used = await served.connect()
            await used.send(get())
            await used.response()
            silent = await served.connect()
            await until(lambda: len(served.server.connections) == 2)
            await served.server.shutdown(LIMIT * 10)
            assert await used.rest() == b""
            assert await silent.rest() == b""

    async def test_request_in_flight_finishes(self) -> None:
        """A request in flight: new connections are refused, the request is answered (with
        ``Connection: close``) and shutdown returns once it is, long before its grace."""
        started = asyncio.Event()
        release = asyncio.Event()

        async def handle(request: Request) -> Response:
            started.set()
            await release.wait()
            return Response(200, body=b"done")

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            await started.wait()
            shutdown = asyncio.create_task(served.server.shutdown(LIMIT * 10))
            await until(lambda: served.server.closing)
            with pytest.raises(ConnectionRefusedError):
                await Client.connect(served.port)
            assert not shutdown.done()
            release.set()
            answer = await client.response()
            assert (answer.body, answer.get("Connection")) == (b"done", "close")
            assert await client.rest() == b""
            await shutdown

    async def test_stuck_handler_is_cut_after_grace(self) -> None:
        """A handler that never finishes: shutdown returns after the grace period, with the
        handler cancelled and the connection closed without an answer."""
        grace = 0.2
        started = asyncio.Event()
        unwound = asyncio.Event()

        async def handle(request: Request) -> Response:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                unwound.set()
            return Response(200)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(get())
            await started.wait()
            loop = asyncio.get_running_loop()
            begun = loop.time()
            await served.server.shutdown(grace)
            assert loop.time() - begun >= grace * 0.9
            assert unwound.is_set()
            assert await client.rest() == b""


class TestIdleSweep:
    async def test_idle_connection_closed_busy_one_kept(self) -> None:
        """A keep-alive connection idle for its keep-alive timeout is closed; one whose
        request takes longer is not."""
        timeout = 0.2
        started = asyncio.Event()
        release = asyncio.Event()

        async def handle(request: Request) -> Response:
            if request.path == "/busy":
                started.set()
                await release.wait()
            return await echo_path(request)

        async with (
            asyncio.timeout(LIMIT),
            serving(handle, timeouts=Timeouts(keepalive=timeout)) as served,
        ):
            loop = asyncio.get_running_loop()
            idle = await served.connect()
            begun = loop.time()
            await idle.send(get("/idle"))
            assert (await idle.response()).body == b"/idle"
            busy = await served.connect()
            await busy.send(get("/busy"))
            await started.wait()
            assert await idle.rest() == b""
            assert loop.time() - begun > timeout * 0.95
            release.set()
            assert (await busy.response()).body == b"/busy"


# -- what the handler sees -----------------------------------------------------------------------


class TestRequestAttributes:
    async def test_line_and_headers(self) -> None:
        """Method, target byte for byte, path decoded, headers in order with repeats and case
        kept (a byte that is not UTF-8 kept as a surrogate escape), version."""
        seen: list[Request] = []

        async def handle(request: Request) -> Response:
            seen.append(request)
            return Response(204)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(
                b"GET /caf%C3%A9/a%2Fb?x=%20&y HTTP/1.1\r\nHost: h\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Raw: \xe9t\xe9\r\n\r\n"
            )
            assert (await client.response()).status == 204
        (request,) = seen
        assert request.method == "GET"
        assert request.raw_path == "/caf%C3%A9/a%2Fb?x=%20&y"
        assert request.path == "/café/a/b"
        assert request.version == "1.1" and request.keep_alive
        assert list(request.headers.items()) == [
            ("Host", "h"),
            ("X-Dup", "1"),
            ("x-dup", "2"),
            ("X-Raw", "\udce9t\udce9"),
        ]
        assert request.headers.getall("X-DUP") == ["1", "2"]
        assert (request.body_exists, request.content_length) == (False, None)

    @pytest.mark.parametrize(
        ("request_bytes", "body_exists", "content_length", "version"),
        [
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", True, 5, "1.1"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", False, 0, "1.1"),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                True,
                None,
                "1.1",
            ),
            (b"PUT / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", True, 5, "1.0"),
            (b"DELETE / HTTP/1.0\r\n\r\n", False, None, "1.0"),
        ],
        ids=["length", "zero-length", "chunked", "http10-length", "http10-none"],
    )
    async def test_body_framing(
        self, request_bytes: bytes, body_exists: bool, content_length: int | None, version: str
    ) -> None:
        """``body_exists`` and ``content_length`` follow the framing; the body reads as sent."""
        seen: list[tuple[str, bool, int | None, str, bytes]] = []

        async def handle(request: Request) -> Response:
            body = await request.read()
            seen.append(
                (request.method, request.body_exists, request.content_length, request.version, body)
            )
            return Response(200)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(request_bytes)
            assert (await client.response()).status == 200
        method = request_bytes.split(b" ", 1)[0].decode()
        assert seen == [
            (method, body_exists, content_length, version, b"hello" if body_exists else b"")
        ]
