"""broker.server against clients that stall, flood, upload past an early answer, or send what
a stricter HTTP/1.1 reading refuses: raw loopback sockets, exact bytes (helpers shared with
``test_server``). Timeouts under test are short; every test is bounded by ``LIMIT``."""

from __future__ import annotations

import ast
import asyncio
import socket
from pathlib import Path

import pytest

from broker.proxy import has_dot_segment
from broker.server import (
    MAX_FIELD_SIZE,
    Request,
    Response,
    Timeouts,
    _Connection,
)

from .test_server import (
    LIMIT,
    assert_refused,
    echo_path,
    get,
    refused_unhandled,
    serving,
    until,
)

#: Short timeouts for the timeouts under test; the others stay long.
SHORT = 0.3
#: ``tcpi_state`` of a connection that was reset (linux/tcp_states.h).
TCP_CLOSE = 7


# -- timeouts ----------------------------------------------------------------------------------


class TestTimeouts:
    async def test_slow_head_is_408(self) -> None:
        """A head that does not end within ``header`` seconds: JSON 408 ``request_timeout``,
        the connection closed; the handler never runs."""

        async def handle(request: Request) -> Response:
            raise AssertionError("never handled")

        async with (
            asyncio.timeout(LIMIT),
            serving(handle, timeouts=Timeouts(header=SHORT)) as served,
        ):
            client = await served.connect()
            start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
            began = asyncio.get_running_loop().time()
            await client.send(start)
            assert_refused(await client.response(), 408, "request_timeout")
            assert await client.rest() == b""
            assert asyncio.get_running_loop().time() - began >= SHORT * 0.9

    async def test_stalled_body_is_408(self) -> None:
        """A body that stalls for ``body`` seconds while the handler reads it: the read fails,
        the answer is JSON 408, the connection closes."""
        failures: list[BaseException] = []

        async def handle(request: Request) -> Response:
            try:
                await request.read()
            except Exception as exc:
                failures.append(exc)
                raise
            return Response(200)

        async with (
            asyncio.timeout(LIMIT),
            serving(handle, timeouts=Timeouts(body=SHORT)) as served,
        ):
            client = await served.connect()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            assert_refused(await client.response(), 408, "request_timeout")
            assert await client.rest() == b""
        assert len(failures) == 1

    async def test_waiting_for_continue_is_not_a_stall(self) -> None:
        """``Expect: 100-continue``: the client waits for the server, so the body timeout
        runs only once the handler reads (and 100 Continue has gone out)."""
        go = asyncio.Event()

        async def handle(request: Request) -> Response:
            await go.wait()
            return Response(200, body=await request.read())

        async with (
            asyncio.timeout(LIMIT),
            serving(handle, timeouts=Timeouts(body=SHORT)) as served,
        ):
            client = await served.connect()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            await asyncio.sleep(SHORT * 3)  # the timeout under test, waited out
            go.set()
            assert await client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            await client.send(b"ok")
            assert (await client.response()).body == b"ok"

    async def test_client_that_reads_nothing_is_cut_off(self) -> None:
        """A streamed answer to a client that reads nothing: after ``write`` seconds waiting
        to write, the connection is cut off, the handler stopped (cancelled, as when a client
        goes away), the request marked ``client_gone`` and the connection reset."""
        failures: list[BaseException] = []
        gone: list[bool] = []
        piece = b"x" * 65536

        async def handle(request: Request) -> None:
            chunked = request.start(200, "OK", [], length=None)
            try:
                for _ in range(100_000):  # far more than any socket buffers
                    await request.write(piece, chunked)
            except (ConnectionError, asyncio.CancelledError) as exc:
                failures.append(exc)
                gone.append(request.client_gone)
                raise
            raise AssertionError("every write went through")

        async with (
            asyncio.timeout(LIMIT * 2),
            serving(handle, timeouts=Timeouts(write=SHORT)) as served,
        ):
            client = await served.connect()
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await client.send(get())
            await until(lambda: bool(failures))
            await until(lambda: not served.server.connections)
            # Reset, not closed: the kernel drops what waited for the client too.
            tcp_state = client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            assert tcp_state == TCP_CLOSE
        assert gone == [True]


# -- flow control on whole answers -------------------------------------------------------------


class TestPipelinedFlood:
    async def test_answers_wait_for_a_client_that_reads_nothing(self) -> None:
        """3,000 pipelined GETs from a client that reads nothing: each whole answer waits
        until the client drains, so the answers written stay bounded (the transport holds
        at most its high-water mark and one answer); once the client reads, every answer
        arrives, in order."""
        count = 3000
        body = b"a" * 16384
        answered: list[int] = []
        conns: list[_Connection] = []

        async def handle(request: Request) -> Response:
            if not conns:
                conns.append(request._conn)
            answered.append(int(request.raw_path[1:]))
            return Response(200, body=body)

        async with asyncio.timeout(LIMIT * 4), serving(handle) as served:
            client = await served.connect()
            await client.send(b"".join(get(f"/{n}") for n in range(count)))
            await until(lambda: len(answered) == count or (bool(conns) and conns[0].writing_paused))
            await asyncio.sleep(0.2)  # the server would go on answering here if it did not wait
            transport = conns[0].transport
            assert transport is not None
            held = transport.get_write_buffer_size()
            assert len(answered) < count / 2
            assert held <= transport.get_write_buffer_limits()[1] + len(body) + 200
            for n in range(count):
                answer = await client.response()
                assert (answer.status, len(answer.body)) == (200, len(body)), n
        assert answered == list(range(count))


# -- Upgrade with a body -----------------------------------------------------------------------


class TestUpgradeBody:
    @pytest.mark.parametrize(
        "framing",
        [b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n"],
        ids=["length", "chunked"],
    )
    async def test_refused(self, framing: bytes) -> None:
        """An Upgrade request with a body (llhttp would skip the body): JSON 400, never
        handled, never forwarded without its body; the body never parsed as a request."""
        await refused_unhandled(
            b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            + framing
            + b"\r\n"
            + get("/smuggled"),
            400,
            "bad_request",
        )


# -- lingering close ---------------------------------------------------------------------------


class TestLingeringClose:
    @pytest.mark.parametrize(
        "framing", [b"Content-Length: %d\r\n", b"Transfer-Encoding: chunked\r\n"]
    )
    async def test_early_answer_reaches_an_uploading_client(self, framing: bytes) -> None:
        """A handler that answers 413 at once while the client uploads 16 MiB: the server
        shuts its side, reads and drops the rest, so the whole upload goes out without a
        reset and the client reads its 413, then the end of the connection."""
        size = 16 * 1024 * 1024

        async def handle(request: Request) -> Response:
            return Response(413, body=b"too large")

        async with asyncio.timeout(LIMIT * 2), serving(handle) as served:
            client = await served.connect()
            if b"%d" in framing:
                head = framing % size
                body = b"z" * size
            else:
                head = framing
                body = b"%x\r\n%s\r\n" % (size, b"z" * size) + b"0\r\n\r\n"
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            answer = await client.response()
            assert (answer.status, answer.body) == (413, b"too large")
            assert answer.get("Connection") == "close"
            await client.send(body)  # no reset: the server still reads
            assert await client.rest() == b""

    async def test_lingering_ends_after_its_time(self) -> None:
        """A client that neither sends more nor closes: the lingering connection is closed
        after ``lingering`` seconds."""

        async def handle(request: Request) -> Response:
            return Response(413)

        async with (
            asyncio.timeout(LIMIT),
            serving(handle, timeouts=Timeouts(lingering=SHORT)) as served,
        ):
            client = await served.connect()
            await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc")
            assert (await client.response()).status == 413
            assert await client.rest() == b""
            await until(lambda: not served.server.connections)


# -- what a request may look like --------------------------------------------------------------


class TestRequestShape:
    @pytest.mark.parametrize(
        "method",
        [
            "GET",
            "HEAD",
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "OPTIONS",
            "TRACE",
            "MERGE",
            "PROPFIND",
            "PROPPATCH",
            "MKCOL",
            "COPY",
            "MOVE",
            "LOCK",
            "UNLOCK",
            "REPORT",
            "SEARCH",
            "PURGE",
            "QUERY",
        ],
    )
    async def test_known_methods_pass(self, method: str) -> None:
        """Every method an ERP API uses (OData v2's MERGE, PATCH, WebDAV's) reaches the
        handler as sent."""
        seen: list[str] = []

        async def handle(request: Request) -> Response:
            seen.append(request.method)
            return Response(204)

        async with asyncio.timeout(LIMIT), serving(handle) as served:
            client = await served.connect()
            await client.send(method.encode() + b" /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.response(method)).status == 204
        assert seen == [method]

    @pytest.mark.parametrize(
        ("request_bytes", "status", "code"),
        [
            (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not_implemented"),
            (b"DESCRIBE / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not_implemented"),
            (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
            (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
            (b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
            (
                get("/", b"".join(b"X-%d: %s\r\n" % (n, b"v" * 8000) for n in range(100))),
                431,
                "header_too_large",
            ),
            (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "bad_request"),
            (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400, "bad_request"),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                501,
                "not_implemented",
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
                400,
                "bad_request",
            ),
            (
                b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                400,
                "bad_request",
            ),
        ],
        ids=[
            "extension-method",
            "rtsp-method",
            "http2",
            "http09",
            "http12",
            "head-over-limit",
            "no-host",
            "two-hosts",
            "two-hosts-http10",
            "host-space",
            "host-slash",
            "host-userinfo",
            "te-gzip-chunked",
            "te-chunked-gzip",
            "te-on-http10",
        ],
    )
    async def test_refused(self, request_bytes: bytes, status: int, code: str) -> None:
        """Refused with the status and code the README lists; never handled; closed."""
        await refused_unhandled(request_bytes, status, code)

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: erp.example:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            get("/", b"".join(b"X-%d: %s\r\n" % (n, b"v" * 1000) for n in range(60))),
            get("/", b"X-Big: " + b"b" * (MAX_FIELD_SIZE - 5) + b"\r\n"),
        ],
        ids=[
            "http10-no-host",
            "name-port",
            "ipv6",
            "ipv4",
            "empty-host",
            "60k-head",
            "one-8k-field",
        ],
    )
    async def test_accepted(self, request_bytes: bytes) -> None:
        """What stays legal: HTTP/1.0 without Host, every form of host, a large head under
        the limit."""
        async with asyncio.timeout(LIMIT), serving(echo_path) as served:
            client = await served.connect()
            await client.send(request_bytes)
            assert (await client.response()).status == 200


class TestPathParameters:
    @pytest.mark.parametrize(
        "path",
        [
            "/ifs/..;/admin",
            "/ifs/..;jsessionid=1/x",
            "/ifs/%2e%2e;/admin",
            "/ifs/%2E%2E%3B/admin",
            "/ifs/.;/x",
            "/ifs/%252e%252e;/x",
            "/ifs/..;",
        ],
    )
    def test_dot_segments_with_parameters_refused(self, path: str) -> None:
        """``..;`` and ``.;`` (Tomcat, Jetty and WebLogic read them as ``..`` and ``.``) are
        dot segments, however encoded."""
        assert has_dot_segment(path)

    @pytest.mark.parametrize("path", ["/ifs/a;b/c", "/ifs/...;/x", "/ifs/;../x", "/ifs/x..;"])
    def test_other_parameters_pass(self, path: str) -> None:
        assert not has_dot_segment(path)


# -- layers ------------------------------------------------------------------------------------


class TestWireImports:
    @pytest.mark.parametrize("module", ["server", "flow"])
    def test_wire_imports_nothing_above_it(self, module: str) -> None:
        """The wire modules import nothing from the proxy, tokens, connectors or errors:
        what a refusal looks like is given to the server."""
        source = (Path(__file__).parents[2] / "broker" / f"{module}.py").read_text()
        imported: set[str] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    imported.add(node.module or "")
                elif node.module and node.module.startswith("broker"):
                    imported.add(node.module.removeprefix("broker."))
            elif isinstance(node, ast.Import):
                imported.update(a.name.removeprefix("broker.") for a in node.names)
        forbidden = {"proxy", "tokens", "connectors", "errors", "answers", "upstream"}
        assert not {name.split(".")[0] for name in imported} & forbidden
