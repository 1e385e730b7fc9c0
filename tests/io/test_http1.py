"""broker.http1 against real servers on loopback: the bytes that go out, the connections that
are kept, reused, replayed or closed, and every way an ERP's answer can go wrong.

Most servers here are raw ``asyncio`` servers that read the request's bytes and write exact
response bytes, so the framing is the test's to choose; aiohttp's own server checks the client
against a real implementation. Nothing waits on the clock: the tests wait on the events they
need (only the timeouts under test are waited out), and each one runs under
``asyncio.timeout(LIMIT)`` so a hang fails fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from broker import http1
from broker.flow import HIGH_WATER
from broker.http1 import (
    MAX_HEAD,
    InvalidHeader,
    Pool,
    StaleConnection,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamReadTimeout,
)

#: The bound on every test, teardown included.
LIMIT = 5.0
#: The most one socket read hands a protocol (asyncio's and uvloop's read size).
MAX_READ = 256 * 1024
#: A read timeout short enough to wait out in a test.
SHORT = 0.2

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"

_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked\r\n", re.IGNORECASE)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)\r\n", re.IGNORECASE)


# -- a loopback server speaking raw bytes ------------------------------------------------------


class Peer:
    """One connection the server accepted."""

    def __init__(
        self,
        server: Server,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        #: 1 for the first connection accepted.
        self.number = number
        self.reader = reader
        self.writer = writer
        #: Set once the client has closed the connection.
        self.eof = asyncio.Event()

    async def request(self) -> bytes:
        """The next request, head and body as they came (recorded on the server), or b"" once
        the client has closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            self.eof.set()
            return b""
        body = b""
        if _CHUNKED.search(head):
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line, 16)
                body += size_line + await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif (length := _LENGTH.search(head)) is not None:
            body = await self.reader.readexactly(int(length[1]))
        self.server.requests.append((self.number, head + body))
        return head + body

    async def rest(self) -> bytes:
        """Whatever the client sends until it closes the connection."""
        try:
            data = await self.reader.read()
        except ConnectionResetError:
            data = b""
        self.eof.set()
        return data

    def send(self, data: bytes) -> None:
        self.writer.write(data)


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """A loopback server handing each connection to ``handler`` (which closes it by
    returning); it keeps the connections and the requests it saw."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.peers: list[Peer] = []
        #: (connection number, request bytes), in the order they were read.
        self.requests: list[tuple[int, bytes]] = []
        self.port = 0
        self._errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def accepted(self) -> int:
        return len(self.peers)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self.peers:
            peer.writer.transport.abort()
        await self._server.wait_closed()
        await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks
        if self._errors and exc_info[0] is None:
            raise self._errors[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, len(self.peers) + 1, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-way, as several tests make it do
        except asyncio.CancelledError:
            pass  # the test is over (asyncio's streams log a handler task ending cancelled)
        except Exception as exc:
            self._errors.append(exc)
        finally:
            writer.close()


def replying(*responses: bytes) -> Handler:
    """A keep-alive server: each request, on whichever connection, gets the next of
    ``responses`` (the last one again once they run out)."""
    answers = list(responses)

    async def handle(peer: Peer) -> None:
        while await peer.request():
            peer.send(answers.pop(0) if len(answers) > 1 else answers[0])
            await peer.writer.drain()

    return handle


@contextlib.asynccontextmanager
async def pool_to(server: Server | int, **options: Any) -> AsyncIterator[Pool]:
    """A pool to a loopback port; on the way out, no connection may still be open (every
    response was released or closed) once the pool is closed."""
    settings: dict[str, Any] = {
        "ssl_context": None,
        "limit": 4,
        "connect_timeout": LIMIT,
        "read_timeout": LIMIT,
    }
    settings.update(options)
    port = server if isinstance(server, int) else server.port
    pool = Pool("127.0.0.1", port, **settings)
    try:
        yield pool
    finally:
        pool.close()
        await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks
    assert pool.open_connections == 0, "a response was neither released nor closed"


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (the test's timeout bounds the wait)."""
    while not condition():
        await asyncio.sleep(0)


def spy_connections(pool: Pool) -> list[http1._Connection]:
    """The connections ``pool`` hands to requests, in order (to watch one mid-request)."""
    handed: list[http1._Connection] = []
    acquire = pool._acquire

    async def acquire_and_record(*, fresh: bool) -> http1._Connection:
        conn = await acquire(fresh=fresh)
        handed.append(conn)
        return conn

    pool._acquire = acquire_and_record  # type: ignore[method-assign]
    return handed


async def chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def host(server: Server) -> bytes:
    return b"Host: 127.0.0.1:%d\r\n" % server.port


async def get(pool: Pool, target: str = "/") -> bytes:
    """GET ``target``: the whole body, the connection released."""
    response = await pool.request("GET", target, [])
    body = await response.read()
    response.release()
    return body


# -- the request on the wire -------------------------------------------------------------------


class TestRequest:
    """The request goes out as given; only Host and the body's framing are added."""

    async def test_head_byte_for_byte(self) -> None:
        """Method, target (not re-encoded) and headers in order, repeats and case kept."""
        headers = [
            ("Accept", "application/json"),
            ("X-Dup", "1"),
            ("x-dup", "2"),
            ("X-Empty", ""),
            ("X-Tab", "a\tb"),
            ("Authorization", "Bearer t0k3n"),
        ]
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/a%2Fb/c?x=%20&y", headers)
            assert await response.read() == b""
            response.release()
        assert server.requests == [
            (
                1,
                b"GET /a%2Fb/c?x=%20&y HTTP/1.1\r\n"
                + host(server)
                + b"Accept: application/json\r\nX-Dup: 1\r\nx-dup: 2\r\nX-Empty: \r\n"
                b"X-Tab: a\tb\r\nAuthorization: Bearer t0k3n\r\n\r\n",
            )
        ]

    async def test_header_bytes_round_trip(self) -> None:
        """Values are UTF-8 on the wire, and a byte that was not UTF-8 when the client sent it
        (a surrogate escape once decoded) goes out as that same byte."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [("X-A", "caf\u00e9"), ("X-B", "caf\udce9")])
            response.release()
        assert server.requests[0][1].endswith(b"X-A: caf\xc3\xa9\r\nX-B: caf\xe9\r\n\r\n")

    @pytest.mark.parametrize(
        ("method", "framing"),
        [
            ("GET", b""),
            ("HEAD", b""),
            ("OPTIONS", b""),
            ("TRACE", b""),
            ("POST", b"Content-Length: 0\r\n"),
            ("PUT", b"Content-Length: 0\r\n"),
            ("PATCH", b"Content-Length: 0\r\n"),
            ("DELETE", b"Content-Length: 0\r\n"),
        ],
    )
    async def test_no_body(self, method: str, framing: bytes) -> None:
        """Without a body, methods that may carry one say ``Content-Length: 0`` (aiohttp's
        rule); GET and its kind say nothing."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request(method, "/x", [("X-A", "1")])
            response.release()
        assert server.requests == [
            (
                1,
                f"{method} /x HTTP/1.1\r\n".encode()
                + host(server)
                + b"X-A: 1\r\n"
                + framing
                + b"\r\n",
            )
        ]

    @pytest.mark.parametrize("size", [5, 16 * 1024, 16 * 1024 + 1, 3 * 1024 * 1024])
    async def test_bytes_body(self, size: int) -> None:
        """A bytes body goes out whole after its Content-Length, small (one write with the
        head) or large."""
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("POST", "/p", [("Content-Type", "a/b")], body)
            response.release()
        assert server.requests == [
            (
                1,
                b"POST /p HTTP/1.1\r\n"
                + host(server)
                + b"Content-Type: a/b\r\nContent-Length: %d\r\n\r\n" % size
                + body,
            )
        ]

    async def test_stream_without_length_is_chunked(self) -> None:
        """An async-iterator body of unknown length goes out chunked; an empty piece is
        skipped (it would end the body)."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            body = chunks(b"abc", b"", b"0123456789abcdef!")
            response = await pool.request("PUT", "/s", [], body)
            response.release()
        assert server.requests == [
            (
                1,
                b"PUT /s HTTP/1.1\r\n" + host(server) + b"Transfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n",
            )
        ]

    async def test_stream_with_length_is_plain(self) -> None:
        """An async-iterator body with ``length`` goes out as is after that Content-Length."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("PUT", "/s", [], chunks(b"abc", b"defgh"), length=8)
            response.release()
        assert server.requests == [
            (1, b"PUT /s HTTP/1.1\r\n" + host(server) + b"Content-Length: 8\r\n\r\nabcdefgh")
        ]

    @pytest.mark.parametrize(
        ("name", "port", "tls", "line"),
        [
            ("erp.example", 80, False, "Host: erp.example"),
            ("erp.example", 443, True, "Host: erp.example"),
            ("erp.example", 443, False, "Host: erp.example:443"),
            ("erp.example", 80, True, "Host: erp.example:80"),
            ("erp.example", 8443, True, "Host: erp.example:8443"),
            ("::1", 8080, False, "Host: [::1]:8080"),
            ("::1", 443, True, "Host: [::1]"),
        ],
    )
    def test_host_line(self, name: str, port: int, tls: bool, line: str) -> None:
        """The port is left out when it is the scheme's default; IPv6 hosts are bracketed."""
        context = ssl.create_default_context() if tls else None
        pool = Pool(name, port, ssl_context=context, limit=1, connect_timeout=1, read_timeout=1)
        head = pool._head("GET", "/", [("A", "b")], None, None)
        assert head == f"GET / HTTP/1.1\r\n{line}\r\nA: b\r\n\r\n".encode()


class TestHeaderInjection:
    """CR, LF or NUL in a header name or value is refused before any byte is sent (CR or LF
    would start another header or end the head, NUL cuts the value short)."""

    @pytest.mark.parametrize(
        "headers",
        [
            [("X-A", "a\r\nX-Injected: 1")],
            [("X-A", "a\r\n\r\nGET /smuggled HTTP/1.1")],
            [("X-A", "a\nX-Injected: 1")],
            [("X-A", "a\rb")],
            [("X-A", "a\r")],
            [("X-A", "\nb")],
            [("X-A", "a\x00b")],
            [("X-A\r\nX-Injected", "1")],
            [("X-A\x00", "1")],
            [("X-Fine", "1"), ("X-A", "2\r\n"), ("X-Fine", "3")],
        ],
    )
    @pytest.mark.parametrize("body", [None, b"body", "stream"])
    async def test_refused_before_sending(
        self, headers: list[tuple[str, str]], body: bytes | str | None
    ) -> None:
        """InvalidHeader, no connection made: the server's first and only request is the
        valid one sent afterwards."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(NO_CONTENT)) as server,
            pool_to(server) as pool,
        ):
            payload = chunks(b"data") if body == "stream" else body
            assert not isinstance(payload, str)
            with pytest.raises(InvalidHeader):
                await pool.request("POST", "/", headers, payload)
            assert (pool.open_connections, server.accepted) == (0, 0)
            response = await pool.request("GET", "/valid", [])
            response.release()
        assert server.accepted == 1
        assert server.requests == [(1, b"GET /valid HTTP/1.1\r\n" + host(server) + b"\r\n")]


# -- keep-alive ------------------------------------------------------------------------------


class TestKeepAlive:
    """A connection goes back to the pool only when its answer was read to the end and the
    server did not ask to close it."""

    async def test_sequential_requests_share_a_connection(self) -> None:
        """Released after its answer, the connection carries the next request."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool, "/1") == b"ok"
            assert (pool.open_connections, pool.idle_connections) == (1, 1)
            assert await get(pool, "/2") == b"ok"
            assert await get(pool, "/3") == b"ok"
            assert (pool.open_connections, pool.idle_connections) == (1, 1)
        assert server.accepted == 1
        assert [(n, r.split(b" ")[1]) for n, r in server.requests] == [
            (1, b"/1"),
            (1, b"/2"),
            (1, b"/3"),
        ]

    async def test_connection_close_is_honoured(self) -> None:
        """``Connection: close`` from the server: the client closes the connection (the
        server keeps it open) and the next request opens another."""
        answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(answer)
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            assert (pool.open_connections, pool.idle_connections) == (0, 0)
            await server.peers[0].eof.wait()
            assert await get(pool) == b"ok"
        assert server.accepted == 2

    async def test_http10_answer_is_not_reused(self) -> None:
        """An HTTP/1.0 answer without keep-alive closes the connection."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool) == b"ok"
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()
        assert server.accepted == 1

    async def test_unread_body_closes_on_release(self) -> None:
        """release() before the body's end closes the connection: it is not reused."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            response.release()
            assert (pool.open_connections, pool.idle_connections) == (0, 0)
            await server.peers[0].eof.wait()
            assert await get(pool) == b"ok"
        assert server.accepted == 2

    async def test_half_read_body_closes_on_release(self) -> None:
        """The same when part of the body was read through iter_any."""
        release_rest = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            await release_rest.wait()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            pieces = response.iter_any()
            assert isinstance(pieces, AsyncGenerator)
            assert await anext(pieces) == b"12345"
            await pieces.aclose()
            response.release()
            assert pool.open_connections == 0
            await server.peers[0].rest()
            release_rest.set()

    async def test_close(self) -> None:
        """close() closes the connection even when the answer was complete."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"ok"
            response.close()
            assert (pool.open_connections, pool.idle_connections) == (0, 0)
            await server.peers[0].eof.wait()
            assert await get(pool) == b"ok"
        assert server.accepted == 2

    async def test_idle_connection_closed_by_server_is_dropped(self) -> None:
        """A pooled connection the server closes while it is idle leaves the pool at once;
        the next request opens a new one without an error."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(OK)
            if peer.number == 1:
                return  # closes the connection after the answer
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            await until(lambda: pool.open_connections == 0)
            assert pool.idle_connections == 0
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"ok"
            response.close()
        assert server.accepted == 2

    async def test_old_idle_connection_is_not_reused(self) -> None:
        """An idle connection older than KEEPALIVE_TIMEOUT is closed rather than reused."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool) == b"ok"
            pool._idle[0].idle_since -= http1.KEEPALIVE_TIMEOUT + 1
            assert await get(pool) == b"ok"
            await server.peers[0].eof.wait()
            assert pool.open_connections == 1
        assert server.accepted == 2

    async def test_closed_pool(self) -> None:
        """After close(), a request fails and a response released later closes its
        connection."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"ok"
            pool.close()
            response.release()
            assert pool.open_connections == 0
            with pytest.raises(http1.UpstreamError, match="closed"):
                await pool.request("GET", "/", [])


# -- response bodies -------------------------------------------------------------------------


class TestBodies:
    """Bodies framed by length, by chunks or by the end of the connection."""

    @pytest.mark.parametrize("size", [0, 5, 100_000])
    async def test_body_until_close(self, size: int) -> None:
        """No Content-Length, not chunked: the body is everything until the server closes;
        the connection is not reused."""
        first = b"h" * size

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + first)
            await peer.writer.drain()
            peer.send(b"world")

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            assert response.content_length is None
            assert await response.read() == first + b"world"
            response.release()
            assert pool.open_connections == 0
            assert await get(pool) == first + b"world"
        assert server.accepted == 2

    async def test_body_until_close_iter_any(self) -> None:
        """The same read piece by piece; each piece comes as soon as it is sent."""
        more = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\n\r\nfirst")
            await more.wait()
            peer.send(b"second")

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            received = b""
            async for piece in response.iter_any():
                if not received:
                    assert piece == b"first"
                    more.set()
                received += piece
            assert received == b"firstsecond"
            response.release()

    async def test_chunked_read(self) -> None:
        """A chunked body is read whole; the connection is reused."""
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert response.content_length is None
            assert await response.read() == b"hello world"
            response.release()
            assert pool.idle_connections == 1
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_chunked_iter_any_streams(self) -> None:
        """Each chunk is handed on as it arrives, before the next one is sent."""
        sent: list[asyncio.Event] = [asyncio.Event() for _ in range(3)]

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for number, event in enumerate(sent):
                peer.send(b"3\r\n#%d#\r\n" % number)
                await event.wait()
            peer.send(b"0\r\n\r\n")
            while await peer.request():
                peer.send(OK)

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            pieces = []
            async for piece in response.iter_any():
                pieces.append(piece)
                sent[len(pieces) - 1].set()
            assert pieces == [b"#0#", b"#1#", b"#2#"]
            response.release()
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_dribbled_response(self) -> None:
        """A response written a byte at a time (so read in many small pieces) is parsed the
        same."""

        async def handle(peer: Peer) -> None:
            sock = peer.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while await peer.request():
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello":
                    peer.send(bytes([byte]))
                    await peer.writer.drain()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            assert (response.status, response.reason) == (200, "OK")
            assert list(response.headers.items()) == [("Content-Length", "5"), ("X-A", "b")]
            assert await response.read() == b"hello"
            response.release()
            assert await get(pool) == b"hello"
        assert server.accepted == 1

    async def test_head_fields(self) -> None:
        """Status, reason and headers as sent: repeats and their order kept."""
        answer = (
            b"HTTP/1.1 404 Not Here\r\nSet-Cookie: a=1\r\nX-A: 1\r\nset-cookie: b=2\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert (response.status, response.reason, response.content_length) == (
                404,
                "Not Here",
                0,
            )
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert list(response.headers.items()) == [
                ("Set-Cookie", "a=1"),
                ("X-A", "1"),
                ("set-cookie", "b=2"),
                ("Content-Length", "0"),
            ]
            assert await response.read() == b""
            response.release()
            assert pool.idle_connections == 1

    @pytest.mark.parametrize(
        "size",
        [0, 1, 1000, 16 * 1024 - 60, 16 * 1024, 16 * 1024 + 1, 70_000, HIGH_WATER + 1, 1_000_000],
    )
    @pytest.mark.parametrize("how", ["read", "iter_any"])
    async def test_length_bodies(self, size: int, how: str) -> None:
        """Bodies of every size around the client's internal thresholds arrive whole and in
        order, by read() or iter_any(), written with the head in one piece; the connection
        carries the next request."""
        body = bytes(i % 251 for i in range(size))
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert response.content_length == size
            if how == "read":
                assert await response.read() == body
            else:
                assert b"".join([piece async for piece in response.iter_any()]) == body
            response.release()
            assert pool.idle_connections == 1
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_more_than_announced(self) -> None:
        """A body longer than its Content-Length: the announced bytes are the body, the
        rest is not taken for the next answer (the connection closes)."""
        has_head = asyncio.Event()

        async def handle(peer: Peer) -> None:
            if peer.number > 1:
                return await replying(OK)(peer)
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
            await has_head.wait()
            peer.send(b"cdHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            has_head.set()
            assert await response.read() == b"abcd"
            response.release()
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()
            assert await get(pool) == b"ok"
        assert server.accepted == 2

    async def test_large_body_read_whole(self) -> None:
        """read() of a body many times HIGH_WATER returns all of it (the pause that bounds
        what is buffered must not stall it) and the connection is reused after."""
        body = bytes(range(256)) * (4 * 1024 * 1024 // 256)
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server, read_timeout=1.0) as pool,
        ):
            assert await get(pool) == body
            assert pool.idle_connections == 1
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_unread_body_over_high_water_then_reuse(self) -> None:
        """A body that ended in the read that crossed HIGH_WATER (reading paused), released
        unread: the connection goes back to the pool reading, and the next answer on it
        arrives."""
        body = b"x" * (HIGH_WATER + 1)  # buffered > HIGH_WATER only once all of it is in
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server, read_timeout=1.0) as pool,
        ):
            response = await pool.request("GET", "/", [])
            while not response._done:
                await response._conn.wait()
            assert response._conn._reading_paused
            response.release()  # as the proxy does before a retry, the body unread
            assert pool.idle_connections == 1
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_slow_consumer_bounds_the_buffer(self) -> None:
        """A large body to a consumer slower than the server: reading pauses once HIGH_WATER
        is buffered, so no more than HIGH_WATER and one read ever waits in memory."""
        body = bytes(range(256)) * (8 * 1024 * 1024 // 256)
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        framed = b"".join(
            b"%x\r\n" % len(body[i : i + 100_000]) + body[i : i + 100_000] + b"\r\n"
            for i in range(0, len(body), 100_000)
        )
        answer = head + framed + b"0\r\n\r\n"
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server, read_timeout=1.0) as pool,
        ):
            response = await pool.request("GET", "/", [])
            conn = response._conn
            pieces: list[bytes | memoryview] = []
            pauses = 0
            peak = 0
            async for piece in response.iter_any():
                pieces.append(piece)
                peak = max(peak, len(piece))
                # The slowest consumer: it takes the next piece only once the pool has
                # stopped reading (or the body has ended).
                while not conn._reading_paused and not response._done:
                    await conn.wait()
                    peak = max(peak, response._chunks.size)
                pauses += conn._reading_paused
            assert b"".join(pieces) == body
            assert peak <= HIGH_WATER + MAX_READ
            assert pauses >= len(body) // (HIGH_WATER + MAX_READ)
            response.release()
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_body_cut_short(self) -> None:
        """The server closing before Content-Length bytes: UpstreamClosed from read()."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            with pytest.raises(UpstreamClosed):
                await response.read()
            response.release()
            assert pool.open_connections == 0

    async def test_chunked_body_cut_short(self) -> None:
        """The same for a chunked body, through iter_any."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            received = b""
            with pytest.raises(UpstreamClosed):
                async for piece in response.iter_any():
                    received += piece
            assert received == b"hello"
            response.release()


# -- answers without a body ------------------------------------------------------------------


class TestBodilessAnswers:
    """1xx answers are skipped; 204, 304 and answers to HEAD have no body."""

    @pytest.mark.parametrize("size", [4, 100_000])
    async def test_informational_answers_skipped(self, size: int) -> None:
        """100 Continue and 103 Early Hints before the answer: the answer, with its own
        headers only; the connection is reused."""
        body = b"d" * size
        answer = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\nX-Final: 1\r\n\r\n" % size + body
        )
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("POST", "/", [], b"x")
            assert (response.status, response.reason) == (201, "Created")
            assert list(response.headers.items()) == [
                ("Content-Length", str(size)),
                ("X-Final", "1"),
            ]
            assert await response.read() == body
            response.release()
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_informational_answer_alone_then_the_answer(self) -> None:
        """A 100 Continue that arrives on its own: request() still returns the final answer."""
        answered = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.writer.drain()
            await answered.wait()
            peer.send(OK)
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            connections = spy_connections(pool)
            task = asyncio.create_task(pool.request("GET", "/", []))
            await until(lambda: bool(connections) and connections[0].answered)
            assert not task.done()
            answered.set()
            response = await task
            assert response.status == 200
            assert await response.read() == b"ok"
            response.release()

    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
            b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nContent-Length: 5\r\n\r\n',
            b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\nTransfer-Encoding: chunked\r\n\r\n',
        ],
    )
    async def test_no_body_statuses(self, answer: bytes) -> None:
        """204 and 304 have no body whatever they announce: read() returns at once and the
        connection carries the next request."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert await response.read() == b""
            response.release()
            assert pool.idle_connections == 1
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    async def test_head(self) -> None:
        """The answer to HEAD is its head: an empty body despite its Content-Length; the
        connection carries the next request."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer, OK)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("HEAD", "/", [])
            assert (response.status, response.content_length) == (200, 5)
            assert await response.read() == b""
            assert [piece async for piece in response.iter_any()] == []
            response.release()
            assert (pool.open_connections, pool.idle_connections) == (1, 1)
            assert await get(pool) == b"ok"
        assert server.accepted == 1


# -- a pooled connection found closed --------------------------------------------------------


def closing_after_one_answer() -> Handler:
    """The first connection answers once, then reads the next request and closes without a
    word (as a server whose keep-alive timer just ran out); later ones answer everything."""

    async def handle(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            peer.send(OK)
            await peer.request()
            return
        while await peer.request():
            peer.send(OK)

    return handle


class TestStaleConnection:
    """A request on a pooled connection the server had closed before any byte of the answer
    raises StaleConnection, never sent again here (the proxy's send loop decides); a fresh
    connection is asked for with ``fresh=True``."""

    @pytest.mark.parametrize(
        ("method", "body"),
        [("GET", None), ("HEAD", None), ("DELETE", None), ("PUT", b"data"), ("OPTIONS", None)],
    )
    async def test_stale_then_fresh(self, method: str, body: bytes | None) -> None:
        """StaleConnection, the request sent once; sent again with fresh=True, it goes on a
        new connection and is answered."""
        async with (
            asyncio.timeout(LIMIT),
            Server(closing_after_one_answer()) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool, "/first") == b"ok"
            with pytest.raises(StaleConnection):
                await pool.request(method, "/again", [("X-A", "1")], body)
            assert server.accepted == 1
            response = await pool.request(method, "/again", [("X-A", "1")], body, fresh=True)
            assert response.status == 200
            if method != "HEAD":
                assert await response.read() == b"ok"
            response.release()
        assert server.accepted == 2
        first, (conn_a, sent_a), (conn_b, sent_b) = server.requests
        assert first[0] == 1 and (conn_a, conn_b) == (1, 2)
        assert sent_a == sent_b
        assert sent_a.startswith(f"{method} /again HTTP/1.1\r\n".encode())

    @pytest.mark.parametrize(
        ("method", "body"),
        [
            ("POST", b"data"),
            ("POST", None),
            ("PATCH", b"data"),
            ("PUT", "stream"),
            ("GET", "stream"),
        ],
    )
    async def test_never_sent_twice(self, method: str, body: bytes | str | None) -> None:
        """Whatever the method or body, the pool sends nothing twice: StaleConnection."""
        async with (
            asyncio.timeout(LIMIT),
            Server(closing_after_one_answer()) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool, "/first") == b"ok"
            payload = chunks(b"da", b"ta") if body == "stream" else body
            assert not isinstance(payload, str)
            with pytest.raises(StaleConnection):
                await pool.request(method, "/again", [], payload)
            assert pool.open_connections == 0
        assert server.accepted == 1
        assert [n for n, _ in server.requests] == [1, 1]

    async def test_fresh_connection_is_not_stale(self) -> None:
        """A new connection closed before its answer is UpstreamClosed, not stale: the
        server may have seen the request."""

        async def handle(peer: Peer) -> None:
            await peer.request()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            with pytest.raises(UpstreamClosed) as caught:
                await pool.request("GET", "/", [])
            assert not isinstance(caught.value, StaleConnection)
        assert server.accepted == 1

    async def test_closed_after_part_of_the_answer_not_replayed(self) -> None:
        """A pooled connection closed after some of the answer came back: not replayed."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(OK)
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            with pytest.raises(UpstreamClosed) as caught:
                await pool.request("GET", "/", [])
            assert not isinstance(caught.value, StaleConnection)
        assert server.accepted == 1

    async def test_fresh_within_the_limit(self) -> None:
        """With limit=1, a fresh connection takes an idle one's place."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            assert await get(pool) == b"ok"
            response = await pool.request("GET", "/", [], fresh=True)
            assert await response.read() == b"ok"
            response.release()
            assert pool.open_connections == 1
        assert server.accepted == 2


# -- time limits and unreachable servers -----------------------------------------------------


class TestTimeouts:
    """No read waits longer than read_timeout; connecting takes at most connect_timeout."""

    async def test_no_answer(self) -> None:
        """A server that never answers: UpstreamReadTimeout (a TimeoutError) after
        read_timeout; the connection is closed."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            await peer.rest()

        loop = asyncio.get_running_loop()
        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, read_timeout=SHORT) as pool,
        ):
            started = loop.time()
            with pytest.raises(UpstreamReadTimeout) as caught:
                await pool.request("GET", "/", [])
            assert SHORT * 0.9 <= loop.time() - started < LIMIT / 2  # loop clocks tick in ms
            assert isinstance(caught.value, TimeoutError)
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()

    async def test_body_stalls(self) -> None:
        """The head, then nothing: read() times out after read_timeout."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await peer.rest()

        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, read_timeout=SHORT) as pool,
        ):
            response = await pool.request("GET", "/", [])
            with pytest.raises(UpstreamReadTimeout):
                await response.read()
            response.close()
            await server.peers[0].eof.wait()

    async def test_each_byte_restarts_the_clock(self) -> None:
        """The limit is per read, not per answer: a body trickling in, each byte well within
        read_timeout but the whole longer than it, arrives whole."""
        pieces = 6
        gap = SHORT / 4
        go = [asyncio.Event() for _ in range(pieces)]

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % pieces)
            for event in go:
                await event.wait()
                peer.send(b"x")
            await peer.rest()

        loop = asyncio.get_running_loop()
        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, read_timeout=SHORT) as pool,
        ):
            response = await pool.request("GET", "/", [])
            started = loop.time()
            loop.call_later(gap, go[0].set)
            received = b""
            async for piece in response.iter_any():
                received += piece
                if len(received) < pieces:
                    loop.call_later(gap, go[len(received)].set)
            assert received == b"x" * pieces
            assert loop.time() - started > SHORT * 1.1
            response.release()
            assert pool.idle_connections == 1

    async def test_refused(self) -> None:
        """Nothing listening: an OSError from request(); nothing left counted."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        async with asyncio.timeout(LIMIT), pool_to(port) as pool:
            with pytest.raises(ConnectionRefusedError):
                await pool.request("GET", "/", [])
            assert (pool.open_connections, pool._connecting) == (0, 0)

    @pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping the SYNs")
    async def test_tcp_connect_timeout(self) -> None:
        """A listener whose accept queue is full (Linux drops the SYNs): TimeoutError after
        connect_timeout, not a read timeout."""
        loop = asyncio.get_running_loop()
        with socket.socket() as listener, socket.socket() as filler:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            filler.connect(("127.0.0.1", port))  # the queue's one place
            async with asyncio.timeout(LIMIT), pool_to(port, connect_timeout=SHORT) as pool:
                started = loop.time()
                with pytest.raises(TimeoutError) as caught:
                    await pool.request("GET", "/", [])
                assert SHORT * 0.9 <= loop.time() - started < LIMIT / 2  # loop clocks tick in ms
                assert not isinstance(caught.value, UpstreamReadTimeout)
                assert (pool.open_connections, pool._connecting) == (0, 0)

    async def test_tls_handshake_timeout(self, tls_ca: trustme.CA) -> None:
        """TCP accepted, TLS never answered: the handshake counts toward connect_timeout."""
        context = ssl.create_default_context()
        tls_ca.configure_trust(context)

        async def handle(peer: Peer) -> None:
            await peer.rest()

        loop = asyncio.get_running_loop()
        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, ssl_context=context, connect_timeout=SHORT) as pool,
        ):
            started = loop.time()
            with pytest.raises(TimeoutError):
                await pool.request("GET", "/", [])
            assert SHORT * 0.9 <= loop.time() - started < LIMIT / 2  # loop clocks tick in ms
            assert (pool.open_connections, pool._connecting) == (0, 0)
            await server.peers[0].eof.wait()


# -- malformed answers -----------------------------------------------------------------------


class TestMalformed:
    """An answer that is not HTTP/1.1 is an UpstreamProtocolError; its connection closes."""

    @pytest.mark.parametrize(
        "answer",
        [
            b"NOT HTTP AT ALL\r\n\r\n",
            b"HTTP/1.1 2xx OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            # framing the client will not guess at, protocols that are not HTTP/1.x
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunkedx\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: identity\r\n\r\n",
            b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ICE/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 100 Continue\r\n\r\nRTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ],
    )
    async def test_malformed_head(self, answer: bytes) -> None:
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer)) as server,
            pool_to(server) as pool,
        ):
            with pytest.raises(UpstreamProtocolError):
                await pool.request("GET", "/", [])
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()

    async def test_malformed_chunk(self) -> None:
        """A bad chunk size in the body: read() raises UpstreamProtocolError."""
        has_head = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await has_head.wait()
            peer.send(b"zz\r\n")
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            has_head.set()
            with pytest.raises(UpstreamProtocolError):
                await response.read()
            response.release()
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()

    @pytest.mark.parametrize("shape", ["many", "one"])
    async def test_head_too_large(self, shape: str) -> None:
        """A head over MAX_HEAD (many headers, or one huge one) is refused."""
        if shape == "many":
            fields = b"".join(
                b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD // 1000 + 2)
            )
        else:
            fields = b"X-Huge: " + b"v" * MAX_HEAD + b"\r\n"
        answer = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer)) as server,
            pool_to(server) as pool,
        ):
            with pytest.raises(UpstreamProtocolError, match="larger than"):
                await pool.request("GET", "/", [])
            assert pool.open_connections == 0

    async def test_head_just_under_the_limit(self) -> None:
        """A large head under MAX_HEAD is fine."""
        fields = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD // 1100))
        answer = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer)) as server,
            pool_to(server) as pool,
        ):
            assert await get(pool) == b"ok"

    async def test_bytes_after_the_answer(self) -> None:
        """Bytes the server sends unasked after a complete answer: the answer stands, the
        connection does not go back to the pool."""
        has_answer = asyncio.Event()

        async def handle(peer: Peer) -> None:
            if peer.number > 1:
                return await replying(OK)(peer)
            await peer.request()
            peer.send(OK)
            await has_answer.wait()
            peer.send(b"garbage\r\n\r\n")
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"ok"
            has_answer.set()
            await server.peers[0].eof.wait()
            response.release()
            assert pool.open_connections == 0
            assert await get(pool) == b"ok"
        assert server.accepted == 2


# -- the connection limit and cancellation ----------------------------------------------------


class TestLimit:
    """At most ``limit`` connections; a request over it waits its turn."""

    async def test_second_request_waits_for_the_first(self) -> None:
        """limit=1: the second request waits until the first is released, then reuses its
        connection; the server sees one connection, both answered."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            second = asyncio.create_task(pool.request("GET", "/2", []))
            await until(lambda: len(pool._waiters) == 1)
            assert not second.done() and len(server.requests) == 1
            assert await first.read() == b"ok"
            first.release()
            response = await second
            assert await response.read() == b"ok"
            response.release()
            assert pool.open_connections == 1
        assert server.accepted == 1
        assert [(n, r.split(b" ")[1]) for n, r in server.requests] == [(1, b"/1"), (1, b"/2")]

    async def test_closed_connection_frees_its_place(self) -> None:
        """A waiting request gets a new connection when the busy one is closed."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            second = asyncio.create_task(get(pool, "/2"))
            await until(lambda: len(pool._waiters) == 1)
            first.close()
            assert await second == b"ok"
        assert server.accepted == 2

    async def test_many_waiters(self) -> None:
        """Twenty requests through limit=2: all answered, never more than two connections."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=2) as pool,
        ):
            peak = 0

            async def one(number: int) -> bytes:
                nonlocal peak
                response = await pool.request("GET", f"/{number}", [])
                peak = max(peak, pool.open_connections)
                body = await response.read()
                response.release()
                return body

            assert await asyncio.gather(*(one(n) for n in range(20))) == [b"ok"] * 20
            assert peak <= 2
        assert server.accepted == 2
        assert len(server.requests) == 20

    async def test_cancelled_waiter_leaves_no_trace(self) -> None:
        """A request cancelled while waiting for its turn leaves the queue."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            second = asyncio.create_task(pool.request("GET", "/2", []))
            await until(lambda: len(pool._waiters) == 1)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            assert len(pool._waiters) == 0
            assert await first.read() == b"ok"
            first.release()
            assert await get(pool, "/3") == b"ok"
        assert server.accepted == 1

    async def test_close_wakes_waiters(self) -> None:
        """Closing the pool fails the requests waiting for a connection."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            second = asyncio.create_task(pool.request("GET", "/2", []))
            await until(lambda: len(pool._waiters) == 1)
            pool.close()
            with pytest.raises(http1.UpstreamError, match="closed"):
                await second
            assert await first.read() == b"ok"
            first.release()
            assert pool.open_connections == 0
        assert server.accepted == 1

    async def test_woken_waiter_cancelled_passes_its_turn_on(self) -> None:
        """A waiter woken for a free connection but cancelled before it could take it hands
        its turn to the next waiter, which would otherwise wait forever."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, limit=1) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            assert await first.read() == b"ok"
            second = asyncio.create_task(pool.request("GET", "/2", []))
            third = asyncio.create_task(pool.request("GET", "/3", []))
            await until(lambda: len(pool._waiters) == 2)
            first.release()  # wakes the second request...
            second.cancel()  # ... cancelled before it runs
            response = await third
            assert await response.read() == b"ok"
            response.release()
            with pytest.raises(asyncio.CancelledError):
                await second
        assert server.accepted == 1


class TestCancellation:
    """A cancelled request closes its connection: it cannot carry another request."""

    async def test_cancelled_waiting_for_the_head(self) -> None:
        """Cancelled after sending, before the answer: the connection is closed; the server
        sees it end."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            task = asyncio.create_task(pool.request("GET", "/", []))
            await until(lambda: bool(server.requests))
            assert pool.open_connections == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (pool.open_connections, pool.idle_connections) == (0, 0)
            await server.peers[0].eof.wait()

    async def test_cancelled_during_upload(self) -> None:
        """Cancelled while the body streams: the connection is closed."""
        more = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await more.wait()
            yield b"never"

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            assert await peer.reader.readexactly(10) == b"5\r\nfirst\r\n"
            peer.server.requests.append((peer.number, b"first"))
            assert await peer.rest() == b""

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            task = asyncio.create_task(pool.request("POST", "/", [], body()))
            await until(lambda: bool(server.requests))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()


# -- TLS ---------------------------------------------------------------------------------------


class TestTls:
    """HTTPS to an ERP: verified against the configured CA."""

    async def test_trusted(self, tls_ca: trustme.CA, server_ssl: ssl.SSLContext) -> None:
        """A context trusting the test CA: answers, and the connection is kept."""
        context = ssl.create_default_context()
        tls_ca.configure_trust(context)
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK), ssl_context=server_ssl) as server,
            pool_to(server, ssl_context=context) as pool,
        ):
            assert await get(pool, "/1") == b"ok"
            assert await get(pool, "/2") == b"ok"
            body = b"y" * (1024 * 1024)
            response = await pool.request("POST", "/3", [], body)
            response.release()
        assert server.accepted == 1
        assert server.requests[0] == (1, b"GET /1 HTTP/1.1\r\n" + host(server) + b"\r\n")
        assert server.requests[2][1].endswith(b"\r\n\r\n" + body)

    async def test_untrusted(self, server_ssl: ssl.SSLContext) -> None:
        """The system's CAs do not know the test CA: SSLCertVerificationError."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK), ssl_context=server_ssl) as server,
            pool_to(server, ssl_context=ssl.create_default_context()) as pool,
        ):
            with pytest.raises(ssl.SSLCertVerificationError):
                await pool.request("GET", "/", [])
            assert (pool.open_connections, pool._connecting) == (0, 0)
        assert server.requests == []


# -- an answer before the upload ends --------------------------------------------------------


async def endless() -> AsyncIterator[bytes]:
    """An upload that never ends (64 KiB at a time)."""
    piece = b"u" * 65536
    while True:
        yield piece


class TestEarlyAnswer:
    """The server answers before reading the whole body (413, 401, ...): the client stops
    sending, returns the answer, and does not reuse the connection."""

    TOO_LARGE = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo much"

    @pytest.mark.parametrize("length", [None, 10 * 1024 * 1024 * 1024])
    async def test_server_stops_reading(self, length: int | None) -> None:
        """The server answers after the head and reads nothing more, keeping the connection
        open: the client, blocked on a full send buffer, still gets the 413."""

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            peer.send(self.TOO_LARGE)
            await asyncio.Event().wait()  # reads nothing more, closes nothing

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("PUT", "/", [], endless(), length=length)
            assert response.status == 413
            assert await response.read() == b"too much"
            response.release()
            assert pool.open_connections == 0
        assert server.accepted == 1

    async def test_server_answers_and_closes(self) -> None:
        """The server answers after the head, shuts its side and discards the rest (a
        lingering close): the client gets the 413, not an error."""

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            peer.send(self.TOO_LARGE)
            peer.writer.write_eof()
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("PUT", "/", [], endless())
            assert response.status == 413
            assert await response.read() == b"too much"
            # The client's transport flushes what it had buffered, then closes: the
            # connection is gone before the response is released.
            await server.peers[0].eof.wait()
            assert pool.open_connections == 0
            response.release()

    async def test_answer_between_pieces(self) -> None:
        """An answer that arrives while the body waits for its next piece: that piece is not
        sent (nor the body's end), the answer is returned."""
        answered = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await answered.wait()
            yield b"second"
            yield b"third"

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            assert await peer.reader.readexactly(10) == b"5\r\nfirst\r\n"
            peer.send(self.TOO_LARGE)
            peer.server.requests.append((peer.number, await peer.rest()))

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            connections = spy_connections(pool)
            task = asyncio.create_task(pool.request("POST", "/", [], body()))
            await until(lambda: bool(connections) and connections[0].response is not None)
            answered.set()
            response = await task
            assert response.status == 413
            assert await response.read() == b"too much"
            response.release()
            assert pool.open_connections == 0
            await server.peers[0].eof.wait()
        assert server.requests == [(1, b"")]


# -- against aiohttp's server ----------------------------------------------------------------


class TestAgainstAiohttp:
    """The client against a real HTTP/1.1 server implementation."""

    async def test_methods_and_bodies_on_one_connection(self) -> None:
        """GET, POST, a chunked PUT, DELETE and a streamed answer: the server reads each as
        sent, and one connection carries them all."""
        transports: set[int] = set()
        keep: list[Any] = []  # the transports stay alive: their ids cannot be reused

        async def echo(request: web.BaseRequest) -> web.StreamResponse:
            keep.append(request.transport)
            transports.add(id(request.transport))
            data = await request.read()
            headers = {
                "X-Method": request.method,
                "X-Path": request.raw_path,
                "X-Chunked": str(request.headers.get("Transfer-Encoding") == "chunked"),
            }
            if request.path == "/stream":
                response = web.StreamResponse(headers=headers)
                response.enable_chunked_encoding()
                await response.prepare(request)
                for piece in (b"a" * 1000, b"b" * 70_000, b"c"):
                    await response.write(piece)
                await response.write_eof()
                return response
            return web.Response(body=data, headers=headers)

        server = RawTestServer(echo, host="127.0.0.1")
        await server.start_server()
        try:
            async with asyncio.timeout(LIMIT), pool_to(server.port or 0) as pool:
                cases: list[tuple[str, str, http1.Body, bytes, str]] = [
                    ("GET", "/g?q=%41", None, b"", "False"),
                    ("POST", "/p", b"payload", b"payload", "False"),
                    ("PUT", "/u", chunks(b"ab", b"cd"), b"abcd", "True"),
                    ("DELETE", "/d", None, b"", "False"),
                    ("GET", "/stream", None, b"a" * 1000 + b"b" * 70_000 + b"c", "False"),
                ]
                for method, target, body, expected, chunked in cases:
                    response = await pool.request(method, target, [("X-Any", "v")], body)
                    assert response.status == 200
                    assert response.headers["X-Method"] == method
                    assert response.headers["X-Path"] == target
                    assert response.headers["X-Chunked"] == chunked
                    received = b"".join([piece async for piece in response.iter_any()])
                    assert received == expected
                    response.release()
                    assert pool.idle_connections == 1
        finally:
            await server.close()
        assert len(transports) == 1


# -- hardening: what a broken or hostile ERP cannot do ----------------------------------------


class TestHardening:
    async def test_a_head_that_never_ends(self) -> None:
        """One header line that never ends: refused once the head passes MAX_HEAD, not
        buffered without bound."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            peer.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            for _ in range(4 * MAX_HEAD // 4096):
                peer.send(b"a" * 4096)
                await peer.writer.drain()
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            with pytest.raises(UpstreamProtocolError, match="larger than"):
                await pool.request("GET", "/", [])
            assert pool.open_connections == 0

    async def test_upload_to_an_erp_that_takes_nothing(self) -> None:
        """An ERP that neither reads the body nor answers: the upload ends after
        read_timeout with UpstreamReadTimeout instead of waiting for ever."""
        head_read = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            head_read.set()
            await peer.eof.wait()  # reads nothing more

        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(256):  # 256 MiB at most: far beyond any socket buffer
                sent += 1
                yield b"x" * (1024 * 1024)

        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, read_timeout=SHORT) as pool,
        ):
            with pytest.raises(UpstreamReadTimeout):
                await pool.request("PUT", "/", [], body())
            assert head_read.is_set() and sent < 256
            assert pool.open_connections == 0
            server.peers[0].eof.set()

    async def test_garbage_in_the_same_read_as_the_answer(self) -> None:
        """A complete answer with garbage behind it in one write: the answer stands, the
        connection is closed rather than reused."""

        async def handle(peer: Peer) -> None:
            if peer.number > 1:
                return await replying(OK)(peer)
            await peer.request()
            peer.send(OK + b"garbage\r\n\r\n")
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            assert response.status == 200 and await response.read() == b"ok"
            response.release()
            await server.peers[0].eof.wait()
            assert pool.open_connections == 0
            assert await get(pool) == b"ok"
        assert server.accepted == 2

    async def test_release_twice_leaves_the_next_request_alone(self) -> None:
        """release() or close() of a response already released has no effect on the
        request its connection carries now."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")) as server,
            pool_to(server) as pool,
        ):
            first = await pool.request("GET", "/", [])
            assert await first.read() == b"ok"
            first.release()
            second = await pool.request("GET", "/", [])
            first.release()
            first.close()
            assert await second.read() == b"second"
            second.release()
            assert pool.idle_connections == 1
        assert server.accepted == 1
