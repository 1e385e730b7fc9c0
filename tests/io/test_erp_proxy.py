"""The ERP side of issue 12 through a real broker: a recording fake ERP (raw loopback bytes)
behind an ``ifs_apps10`` connector (its token from the IFS simulator), and the app's side read
by h11, a strict HTTP/1.1 implementation, so that every byte the app gets is checked.

- framing headers from the ERP are never copied: the broker writes exactly one of its own;
- an ERP answer the broker cannot frame, or that is not HTTP/1.x, is a 502;
- waiting for a free connection to the ERP is bounded by the connector's ``timeout`` (504),
  and other connectors are not held up;
- a request on a pooled connection the ERP had closed is sent once more by the proxy's send
  loop, counted as a retry, only when that is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import h11
import orjson
import pytest
import structlog

from broker import upstream
from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim

from ..conftest import BrokerFactory, ifs_connector, metric
from .test_http1 import OK, Handler, Peer, Server, closing_after_one_answer, replying

#: The bound on every test here (a broker and a simulator start in it).
LIMIT = 20.0


def erp_connector(sim: IfsApps10Sim, ca_file: str, erp: Server, **overrides: Any) -> dict[str, Any]:
    """An IFS connector whose API is the fake ERP (plain HTTP) and whose tokens come from
    the simulator."""
    return ifs_connector(
        sim,
        ca_file,
        base_url=f"http://127.0.0.1:{erp.port}",
        token_url=f"{sim.url}/auth/realms/{sim.realm}/protocol/openid-connect/token",
        **overrides,
    )


class App:
    """One keep-alive connection of the app to the broker, spoken and checked by h11."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.conn = h11.Connection(h11.CLIENT)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> App:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.server.proxy_port
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers (lower-case names, as received) and body of one exchange."""
        assert self.reader is not None and self.writer is not None
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("Host", "broker")]
        if body or method in ("POST", "PUT"):
            headers.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=path, headers=headers))
        data += self.conn.send(h11.Data(data=body)) if body else b""
        data += self.conn.send(h11.EndOfMessage())
        self.writer.write(data)
        response: h11.Response | None = None
        received = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response.status_code, list(response.headers), bytes(received)
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the broker closed the connection mid-answer")


def framing_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n in (b"content-length", b"transfer-encoding")]


@pytest.fixture
async def broker_to(
    ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory
) -> AsyncIterator[Any]:
    """``broker_to(handler, **connector_overrides)``: a fake ERP with that handler and a
    broker whose connector ``ifs`` (route /ifs/) forwards to it."""
    servers: list[Server] = []

    async def start(handler: Handler, **overrides: Any) -> tuple[BrokerServer, Server]:
        erp = await Server(handler).__aenter__()
        servers.append(erp)
        broker = await make_broker({"ifs": erp_connector(ifs_sim, ca_file, erp, **overrides)})
        return broker, erp

    yield start
    for erp in servers:
        await erp.__aexit__(None, None, None)


class TestFramingWrittenByTheBroker:
    @pytest.mark.parametrize("value", [b"5 ", b"5\t", b" 5", b"05"])
    async def test_one_content_length(self, broker_to: Any, value: bytes) -> None:
        """``Content-Length: 5 `` from the ERP: the app gets ``Content-Length: 5``, once, and
        no Transfer-Encoding (before: the ERP's header copied, plus chunked)."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\nX-A: 1\r\n\r\nhello"
        async with asyncio.timeout(LIMIT):
            broker, _ = await broker_to(replying(answer))
            async with App(broker) as app:
                for _ in range(2):
                    status, headers, body = await app.request("GET", "/ifs/x")
                    assert (status, body) == (200, b"hello")
                    assert framing_headers(headers) == [(b"content-length", b"5")]
                    assert (b"x-a", b"1") in headers

    @pytest.mark.parametrize("size", [10, 200_000])
    async def test_connection_naming_content_length(self, broker_to: Any, size: int) -> None:
        """``Connection: Content-Length`` (a hop-by-hop header naming the framing) cannot
        unframe the answer: the app gets the length and the connection stays usable."""
        body = b"z" * size
        answer = (
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: %d\r\n\r\n" % size
            + body
        )
        async with asyncio.timeout(LIMIT):
            broker, _ = await broker_to(replying(answer))
            async with App(broker) as app:
                for _ in range(2):
                    status, headers, received = await app.request("GET", "/ifs/big")
                    assert (status, received) == (200, body)
                    assert framing_headers(headers) == [(b"content-length", str(size).encode())]

    async def test_chunked_from_the_erp(self, broker_to: Any) -> None:
        """A chunked answer goes to the app chunked by the broker, one Transfer-Encoding."""
        answer = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        async with asyncio.timeout(LIMIT):
            broker, _ = await broker_to(replying(answer))
            async with App(broker) as app:
                status, headers, body = await app.request("GET", "/ifs/c")
                assert (status, body) == (200, b"abcde")
                assert framing_headers(headers) == [(b"transfer-encoding", b"chunked")]

    async def test_head_answer_keeps_its_length(self, broker_to: Any) -> None:
        """The answer to HEAD carries the ERP's announced length (the broker's header), and
        the ERP connection is reused."""
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1234 \r\n\r\n"
        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(replying(answer, answer, OK))
            async with App(broker) as app:
                for _ in range(2):
                    status, headers, body = await app.request("HEAD", "/ifs/h")
                    assert (status, body) == (200, b"")
                    assert framing_headers(headers) == [(b"content-length", b"1234")]
            assert erp.accepted == 1


class TestRefusedAnswers:
    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
        ],
    )
    async def test_bad_gateway(self, broker_to: Any, answer: bytes) -> None:
        """An answer the broker will not frame, or not HTTP/1.x: 502 upstream_unreachable,
        the ERP connection closed; the next request gets a new one."""
        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(replying(answer))
            async with App(broker) as app:
                status, _, body = await app.request("GET", "/ifs/x")
                assert status == 502
                assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"
                status, _, _ = await app.request("GET", "/ifs/x")
                assert status == 502
            await erp.peers[0].eof.wait()
            assert erp.accepted == 2


class TestPoolWait:
    async def test_a_full_pool_answers_504_and_spares_other_connectors(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every connection to one ERP held by a stalled upload (the pool shrunk to 2 so the
        test stays small; in production 256): a further request to it gets 504
        upstream_timeout within the connector's timeout; another connector answers."""
        monkeypatch.setattr(upstream, "CONNECTION_LIMIT", 2)
        heads = asyncio.Semaphore(0)

        async def stall(peer: Peer) -> None:
            await peer.reader.readuntil(b"\r\n\r\n")
            heads.release()
            await peer.eof.wait()  # reads no more of the upload, answers nothing

        async with asyncio.timeout(LIMIT), Server(stall) as stuck, Server(replying(OK)) as fine:
            broker = await make_broker(
                {
                    "ifs": erp_connector(ifs_sim, ca_file, stuck, timeout=1.0, replay_max_bytes=0),
                    "other": erp_connector(ifs_sim, ca_file, fine, route="/other/"),
                }
            )
            uploads = []
            for _ in range(2):
                _, writer = await asyncio.open_connection("127.0.0.1", broker.proxy_port)
                writer.write(
                    b"PUT /ifs/upload HTTP/1.1\r\nHost: b\r\nContent-Length: 1000000\r\n\r\n"
                    + b"x" * 1000
                )
                uploads.append(writer)
            for _ in range(2):
                await heads.acquire()
            async with App(broker) as app, App(broker) as other:
                waiting = asyncio.create_task(app.request("GET", "/ifs/x"))
                status, _, body = await other.request("GET", "/other/x")
                assert (status, body) == (200, b"ok")
                assert not waiting.done()
                status, _, body = await waiting
                assert status == 504
                assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
            for writer in uploads:
                writer.close()
            for peer in stuck.peers:
                peer.eof.set()
            assert stuck.accepted == 2


class TestStaleConnection:
    async def test_idempotent_request_sent_again_and_counted(self, broker_to: Any) -> None:
        """The ERP closes a kept-alive connection as the next request arrives on it (its
        keep-alive timer ran out): a GET is sent again on a new connection, answered 200,
        counted in erp_broker_retries_total{reason="stale_connection"} and in attempts."""
        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(closing_after_one_answer())
            async with App(broker) as app:
                assert (await app.request("GET", "/ifs/first"))[0] == 200
                with structlog.testing.capture_logs() as logs:
                    status, _, body = await app.request("GET", "/ifs/again")
                assert (status, body) == (200, b"ok")
            assert erp.accepted == 2
            assert [n for n, _ in erp.requests] == [1, 1, 2]
            labels = {"connector": "ifs", "reason": "stale_connection"}
            assert metric(broker, "erp_broker_retries_total", **labels) == 1
            lines = [line for line in logs if line["event"] == "request"]
            assert [(line["status"], line["attempts"]) for line in lines] == [(200, 2)]

    @pytest.mark.parametrize("method", ["POST", "PATCH"])
    async def test_not_idempotent_not_sent_again(self, broker_to: Any, method: str) -> None:
        """A POST or PATCH on a stale connection is not sent again: 502, sent once."""
        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(closing_after_one_answer())
            async with App(broker) as app:
                assert (await app.request("GET", "/ifs/first"))[0] == 200
                status, _, body = await app.request(method, "/ifs/again", b"{}")
                assert status == 502
                assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"
            assert erp.accepted == 1
            assert len(erp.requests) == 2
            labels = {"connector": "ifs", "reason": "stale_connection"}
            assert metric(broker, "erp_broker_retries_total", **labels) == 0

    async def test_sent_again_once_only(self, broker_to: Any) -> None:
        """A fresh connection closed before its answer too: 502, not a third send."""

        async def handle(peer: Peer) -> None:
            await peer.request()
            if peer.number == 1:
                peer.send(OK)
                await peer.request()
            # closes without an answer

        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(handle)
            async with App(broker) as app:
                assert (await app.request("GET", "/ifs/first"))[0] == 200
                status, _, _ = await app.request("GET", "/ifs/again")
                assert status == 502
            assert erp.accepted == 2
            labels = {"connector": "ifs", "reason": "stale_connection"}
            assert metric(broker, "erp_broker_retries_total", **labels) == 1


class TestKeepalive:
    async def test_connector_keepalive_timeout(self, broker_to: Any) -> None:
        """``keepalive_timeout`` (a connector key): an idle connection older than it is not
        reused, a younger one is (the timeout under test is waited out)."""
        async with asyncio.timeout(LIMIT):
            broker, erp = await broker_to(replying(OK), keepalive_timeout=0.3)
            async with App(broker) as app:
                assert (await app.request("GET", "/ifs/1"))[0] == 200
                assert (await app.request("GET", "/ifs/2"))[0] == 200
                assert erp.accepted == 1
                await asyncio.sleep(0.5)
                assert (await app.request("GET", "/ifs/3"))[0] == 200
            assert erp.accepted == 2
            await erp.peers[0].eof.wait()
