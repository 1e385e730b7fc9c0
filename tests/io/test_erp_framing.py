"""broker.http1 against a recording fake ERP that answers scripted bytes: an answer ends where
its framing says, and nothing beyond it ever reaches another request (issue 12, ERP side).

Each case is an ERP that sends more than its answer: a body longer than its Content-Length,
a second answer behind the first, bytes after a 204, 304 or HEAD answer, bytes on an idle
pooled connection. The answer stands; the connection is discarded; the next request gets its
own answer on a new connection. Before this, llhttp read such bytes as the next answer on the
pooled connection: another request got a foreign status line (a 429 that stalled the
connector, say), or died on an ``assert``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker import http1
from broker.http1 import (
    CHUNKED,
    UNTIL_CLOSE,
    Framing,
    PoolTimeout,
    UpstreamProtocolError,
    body_framing,
)

from .test_http1 import (
    LIMIT,
    OK,
    SHORT,
    Handler,
    Peer,
    Server,
    get,
    pool_to,
    replying,
    until,
)

#: The answer a later request must get, never anything the ERP sent before it.
REAL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"
#: What a confused ERP sends beyond an answer: a whole answer of its own.
FOREIGN = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3600\r\nContent-Length: 7\r\n\r\nforeign"


def first_then_real(first: bytes) -> Handler:
    """Connection 1 answers its first request with ``first`` (answer and what follows it,
    in one write) and then reads on; later connections answer REAL to everything."""

    async def handle(peer: Peer) -> None:
        if peer.number == 1:
            await peer.request()
            peer.send(first)
            await peer.rest()
            return
        while await peer.request():
            peer.send(REAL)

    return handle


def answer_then(first: bytes, later: bytes, go: asyncio.Event) -> Handler:
    """Connection 1 answers ``first``, then sends ``later`` once ``go`` is set; later
    connections answer REAL to everything."""

    async def handle(peer: Peer) -> None:
        if peer.number > 1:
            return await replying(REAL)(peer)
        await peer.request()
        peer.send(first)
        await go.wait()
        peer.send(later)
        await peer.rest()

    return handle


class TestBeyondTheAnswer:
    """Bytes after a complete answer, in the same read: the answer stands, the connection
    is closed, the next request gets REAL on a new connection."""

    @pytest.mark.parametrize(
        ("method", "first", "body"),
        [
            # A length counted in characters over UTF-8 text: the body is longer.
            ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ncaf\xc3\xa9", b"caf\xc3"),
            ("GET", OK + FOREIGN, b"ok"),
            ("GET", OK + b"\r\n", b"ok"),
            ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FOREIGN, b""),
            ("GET", b"HTTP/1.1 204 No Content\r\n\r\n\r\n", b""),
            ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n' + FOREIGN, b""),
            ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforeign", b""),
            ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n" + FOREIGN, b""),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                + FOREIGN,
                b"ok",
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n\r\n",
                b"ok",
            ),
            ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + FOREIGN, b""),
        ],
    )
    async def test_discarded(self, method: str, first: bytes, body: bytes) -> None:
        async with (
            asyncio.timeout(LIMIT),
            Server(first_then_real(first)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request(method, "/first", [])
            assert await response.read() == body
            response.release()
            assert pool.idle_connections == 0
            await server.peers[0].eof.wait()
            for _ in range(3):
                assert await get(pool, "/next") == b"real"
            assert pool.idle_connections == 1
        assert server.accepted == 2

    async def test_longer_body_in_a_later_read(self) -> None:
        """The excess arrives after the client read the answer (and before it was
        released): the connection is closed all the same."""
        sent = asyncio.Event()
        handle = answer_then(OK, b"!!" + FOREIGN, sent)
        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            response = await pool.request("GET", "/", [])
            assert await response.read() == b"ok"
            sent.set()
            await server.peers[0].eof.wait()
            response.release()
            assert pool.open_connections == 0
            assert await get(pool) == b"real"
        assert server.accepted == 2

    async def test_large_body_longer_than_its_length(self) -> None:
        """A large body with its excess in the same read: the announced bytes, exactly."""
        body = b"b" * 100_000
        first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + FOREIGN
        async with (
            asyncio.timeout(LIMIT),
            Server(first_then_real(first)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert await response.read() == body
            response.release()
            assert await get(pool) == b"real"
        assert server.accepted == 2


class TestIdleConnection:
    async def test_bytes_on_an_idle_connection(self) -> None:
        """An answer nobody asked for, on a pooled idle connection: the connection is closed
        at once; the next request gets its own answer, not that one (before: an assert)."""
        idle = asyncio.Event()
        handle = answer_then(OK, FOREIGN, idle)
        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            assert pool.idle_connections == 1
            idle.set()
            await until(lambda: pool.open_connections == 0)
            assert pool.idle_connections == 0
            assert await get(pool) == b"real"
        assert server.accepted == 2

    async def test_half_an_answer_on_an_idle_connection(self) -> None:
        """The start of a head on an idle connection: closed too, never the start of the
        next request's answer."""
        idle = asyncio.Event()
        handle = answer_then(OK, b"HTTP/1.1 500 Oops\r\nX-", idle)
        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            idle.set()
            await until(lambda: pool.open_connections == 0)
            assert await get(pool) == b"real"
        assert server.accepted == 2


class TestRefusedFraming:
    """Framing the client will not guess at, or a protocol that is not HTTP/1.x: an
    UpstreamProtocolError (a 502 at the proxy) and the connection closed (the answers refused
    in one read are cases of test_http1's TestMalformed.test_malformed_head)."""

    async def test_protocol_split_over_reads(self) -> None:
        """The status line's protocol checked even when it arrives a byte at a time."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            for byte in b"RTSP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n":
                peer.send(bytes([byte]))
                await peer.writer.drain()
            await peer.rest()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            with pytest.raises(UpstreamProtocolError):
                await pool.request("GET", "/", [])
            assert pool.open_connections == 0

    async def test_head_a_byte_at_a_time(self) -> None:
        """An answer whose head (and its end) arrives a byte at a time is read as one."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

        async def handle(peer: Peer) -> None:
            while await peer.request():
                for byte in answer:
                    peer.send(bytes([byte]))
                    await peer.writer.drain()

        async with asyncio.timeout(LIMIT), Server(handle) as server, pool_to(server) as pool:
            assert await get(pool) == b"ok"
            assert await get(pool) == b"ok"
        assert server.accepted == 1

    @pytest.mark.parametrize("value", [b"5 ", b" 5", b"5\t", b"05"])
    async def test_length_with_whitespace(self, value: bytes) -> None:
        """``Content-Length: 5 `` (optional whitespace is legal): a length of 5, read as such,
        and the connection reused (before: no length, the body chunked to the app)."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nhello"
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(answer)) as server,
            pool_to(server) as pool,
        ):
            response = await pool.request("GET", "/", [])
            assert response.content_length == 5
            assert await response.read() == b"hello"
            response.release()
            assert pool.idle_connections == 1
        assert server.accepted == 1


def framing_of(method: str, status: int, headers: list[tuple[str, str]]) -> Framing:
    """body_framing() of a head with these headers."""
    lengths = [value for name, value in headers if name.lower() == "content-length"]
    codings = [value for name, value in headers if name.lower() == "transfer-encoding"]
    return body_framing(method, status, lengths, codings)


class TestBodyFraming:
    """The one pure function that decides where an answer's body ends."""

    @pytest.mark.parametrize(
        ("method", "status", "headers", "expected"),
        [
            ("GET", 200, [("Content-Length", "5")], Framing(5, 5)),
            ("GET", 200, [("content-length", " 5 ")], Framing(5, 5)),
            ("GET", 200, [("Transfer-Encoding", "Chunked")], Framing(CHUNKED, None)),
            ("GET", 200, [("Transfer-Encoding", " chunked ")], Framing(CHUNKED, None)),
            ("GET", 200, [], Framing(UNTIL_CLOSE, None)),
            ("HEAD", 200, [("Content-Length", "5")], Framing(0, 5)),
            ("HEAD", 200, [("Transfer-Encoding", "chunked")], Framing(0, None)),
            ("GET", 304, [("Content-Length", "5")], Framing(0, 5)),
            ("GET", 204, [("Content-Length", "0")], Framing(0, None)),
            ("GET", 204, [], Framing(0, None)),
            ("GET", 103, [("Content-Length", "5")], Framing(0, None)),
        ],
    )
    def test_framing(
        self, method: str, status: int, headers: list[tuple[str, str]], expected: Framing
    ) -> None:
        assert framing_of(method, status, headers) == expected

    @pytest.mark.parametrize(
        "headers",
        [
            [("Content-Length", "5"), ("Content-Length", "5")],
            [("Content-Length", "5, 5")],
            [("Content-Length", "+5")],
            [("Content-Length", "-1")],
            [("Content-Length", "")],
            [("Content-Length", "\uff15")],
            [("Content-Length", "9" * 19)],
            [("Transfer-Encoding", "xchunked")],
            [("Transfer-Encoding", "chunked, chunked")],
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
            [("Transfer-Encoding", "gzip, chunked")],
            [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
        ],
    )
    @pytest.mark.parametrize(("method", "status"), [("GET", 200), ("HEAD", 200), ("GET", 204)])
    def test_refused(self, headers: list[tuple[str, str]], method: str, status: int) -> None:
        with pytest.raises(UpstreamProtocolError):
            framing_of(method, status, headers)


class TestPoolWait:
    async def test_waiting_for_a_free_connection_is_bounded(self) -> None:
        """Every connection held by a stalled upload: a further request waits at most the
        connect timeout, then fails with PoolTimeout (a TimeoutError: 504 at the proxy)."""
        head_read = asyncio.Event()

        async def handle(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            head_read.set()
            await peer.eof.wait()

        stall = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            yield b"part"
            await stall.wait()

        async with (
            asyncio.timeout(LIMIT),
            Server(handle) as server,
            pool_to(server, limit=1, connect_timeout=SHORT) as pool,
        ):
            upload = asyncio.create_task(pool.request("PUT", "/", [], stalled(), length=100))
            await head_read.wait()
            with pytest.raises(PoolTimeout) as caught:
                await pool.request("GET", "/", [])
            assert isinstance(caught.value, TimeoutError)
            assert not pool._waiters
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            server.peers[0].eof.set()


class TestKeepaliveTimeout:
    def test_default_below_common_servers(self) -> None:
        """Apache httpd closes idle connections after 5 s: the broker retires them first."""
        assert 0 < http1.KEEPALIVE_TIMEOUT < 5

    async def test_idle_connection_retired_after_the_keepalive_timeout(self) -> None:
        """An idle connection older than the pool's keepalive_timeout is not reused: the
        next request opens a new one (the timeout under test is waited out)."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, keepalive_timeout=SHORT) as pool,
        ):
            assert await get(pool) == b"ok"
            await asyncio.sleep(SHORT * 1.5)
            assert await get(pool) == b"ok"
            await server.peers[0].eof.wait()
            assert pool.open_connections == 1
        assert server.accepted == 2

    async def test_old_idle_connections_retired_when_another_comes_back(self) -> None:
        """Putting a connection back retires those idle longer than keepalive_timeout."""
        async with (
            asyncio.timeout(LIMIT),
            Server(replying(OK)) as server,
            pool_to(server, keepalive_timeout=SHORT) as pool,
        ):
            first = await pool.request("GET", "/1", [])
            second = await pool.request("GET", "/2", [])
            assert await first.read() == b"ok" and await second.read() == b"ok"
            first.release()
            await asyncio.sleep(SHORT * 1.5)
            second.release()
            assert (pool.open_connections, pool.idle_connections) == (1, 1)
            await server.peers[0].eof.wait()
        assert server.accepted == 2
