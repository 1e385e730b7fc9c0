"""The request path's fast versions give what the plain ones gave (bench/RESULTS.md)."""

from __future__ import annotations

import datetime
import io
import random
import string
import uuid
from typing import Any

import orjson
import pytest
import structlog
from prometheus_client import generate_latest

from broker import logs
from broker.logs import _UtcTimestamp, configure_logging, info_line
from broker.metrics import ConnectorSeries, Metrics
from broker.proxy import has_dot_segment, new_request_id, request_headers
from broker.secrets import MASK, _Registry


@pytest.fixture
def restore_logging() -> Any:
    saved = structlog.get_config()
    direct = logs._direct
    yield
    structlog.configure(**saved)
    logs._direct = direct


class TestInfoLine:
    def test_same_line_as_structlog(self, restore_logging: None) -> None:
        """info_line writes what log.info writes, redaction included (timestamps aside)."""
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger("test")
        fields = {"path": "/x/super-secret-value", "status": 200, "token": "t", "n": None}
        from broker.secrets import register

        register("super-secret-value")
        log.info("request", **fields)
        info_line(log, "request", dict(fields))
        first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
        first.pop("timestamp"), second.pop("timestamp")
        assert first == second
        assert list(first) == list(second)
        assert first["path"] == f"/x/{MASK}" and first["token"] == MASK

    def test_exc_info_still_rendered(self, restore_logging: None) -> None:
        """Lines without exc_info skip the exception renderer; lines with it still get it."""
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger("test-exc")
        try:
            raise ValueError("boom")
        except ValueError as exc:
            error = exc
        log.info("request", status=500, exc_info=error)
        info_line(log, "request", {"status": 500, "exc_info": error})
        info_line(log, "request", {"status": 200})
        first, second, third = (orjson.loads(line) for line in stream.getvalue().splitlines())
        first.pop("timestamp"), second.pop("timestamp"), third.pop("timestamp")
        assert first == second and "exception" in first
        assert third == {"status": 200, "event": "request", "level": "info"}

    def test_falls_back_when_reconfigured(self, restore_logging: None) -> None:
        """Under capture_logs (a reconfiguration) the line goes through structlog."""
        configure_logging("info", "json", stream=io.StringIO())
        log = structlog.get_logger("test-capture")
        with structlog.testing.capture_logs() as captured:
            info_line(log, "request", {"status": 200})
        assert captured == [{"status": 200, "event": "request", "log_level": "info"}]

    def test_nothing_below_the_level(self, restore_logging: None) -> None:
        """At warning, info lines are dropped on both paths."""
        stream = io.StringIO()
        configure_logging("warning", "json", stream=stream)
        info_line(structlog.get_logger("test-level"), "request", {"status": 200})
        assert stream.getvalue() == ""


class TestTimestamp:
    @pytest.mark.parametrize(
        "nanos",
        [0, 1_700_000_000_000_000_000, 1_700_000_000_123_456_789, 1_799_999_999_999_999_999],
    )
    def test_same_text_as_isoformat(self, nanos: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """What TimeStamper(fmt="iso", utc=True) writes, fraction left out when zero."""
        monkeypatch.setattr(logs.time, "time_ns", lambda: nanos)
        seconds, rest = divmod(nanos, 10**9)
        expected = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
        expected = expected.replace(microsecond=rest // 1000)
        stamped = _UtcTimestamp()(None, "info", {})["timestamp"]
        assert stamped == expected.isoformat().replace("+00:00", "Z")


class TestScrubIndex:
    def test_indexed_scrub_matches_the_linear_one(self) -> None:
        """Past the linear limit, the index finds every secret the linear search finds."""
        rng = random.Random(7)
        alphabet = string.ascii_letters + "-_."
        secrets = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(6, 40))) for _ in range(300)
        ]
        registry = _Registry()
        for secret in secrets:
            registry.add(secret)
        assert registry._index is not None
        for _ in range(500):
            parts = [
                rng.choice(secrets) if rng.random() < 0.3 else rng.choice(string.ascii_letters) * 5
                for _ in range(5)
            ]
            text = " ".join(parts)
            linear = text
            for secret in registry._snapshot:
                if secret in linear:
                    linear = linear.replace(secret, MASK)
            assert registry.scrub(text) == linear

    def test_short_texts_against_many_long_tokens(self) -> None:
        """Thousands of long tokens and a few short secrets: texts of every length are
        scrubbed as the exhaustive search scrubs them (short ones look only at what fits)."""
        rng = random.Random(11)
        alphabet = string.ascii_letters + string.digits
        tokens = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(80, 120))) for _ in range(1000)
        ]
        short = [
            "pw-" + "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12)))
            for _ in range(20)
        ]
        registry = _Registry()
        for secret in tokens + short:
            registry.add(secret)
        for _ in range(400):
            parts = [
                rng.choice(short)
                if rng.random() < 0.3
                else rng.choice(tokens)
                if rng.random() < 0.1
                else "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                for _ in range(rng.randint(1, 4))
            ]
            text = "/".join(parts)
            exhaustive = text
            for secret in registry._snapshot:
                if secret in exhaustive:
                    exhaustive = exhaustive.replace(secret, MASK)
            assert registry.scrub(text) == exhaustive


class TestRequestPath:
    def test_request_id_is_a_uuid4(self) -> None:
        """32 hex digits of a version-4, RFC 4122 UUID, as uuid4().hex."""
        value = new_request_id()
        parsed = uuid.UUID(hex=value)
        assert len(value) == 32 and parsed.hex == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122

    def test_dot_segments(self) -> None:
        """The fast path (no '.' and no '%') changes no answer."""
        for path, refused in [
            ("/a/b", False),
            ("/a.b/c", False),
            ("/a/./b", True),
            ("/a/%2e%2E/b", True),
            ("/a\\..\\b", True),
            ("/%252e%252e/", True),
        ]:
            assert has_dot_segment(path) is refused

    def test_connection_named_headers_dropped(self) -> None:
        """Headers named by Connection go, repeats stay, credentials never pass."""
        from multidict import CIMultiDict

        headers = CIMultiDict(
            [
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("A", "1"),
                ("A", "2"),
                ("Authorization", "Bearer app"),
                ("Accept", "*/*"),
            ]
        )
        assert list(request_headers(headers).items()) == [("A", "1"), ("A", "2"), ("Accept", "*/*")]


class TestConnectorSeries:
    def test_same_series_as_labels(self) -> None:
        """Cached children count into the contract's series; in-flight is read at scrape."""
        metrics = Metrics()
        inflight = [0]
        series = ConnectorSeries(metrics, "erp", lambda: inflight[0])
        for method in ("GET", "GET", "BREW"):
            series.count_request(method, 200)
        series.request_duration.observe(0.01)
        inflight[0] = 3
        text = generate_latest(metrics.registry).decode()
        assert 'erp_broker_requests_total{connector="erp",method="GET",status="200"} 2.0' in text
        assert 'erp_broker_requests_total{connector="erp",method="OTHER",status="200"} 1.0' in text
        assert 'erp_broker_inflight_requests{connector="erp"} 3.0' in text
        assert 'erp_broker_request_duration_seconds_count{connector="erp"} 1.0' in text


class TestFastPaths:
    def test_token_valid_is_get_without_a_coroutine(self) -> None:
        """TokenManager.valid(): the current token when usable, None whenever get() would wait."""
        from broker.credential import Token
        from broker.tokens import TokenManager

        manager = TokenManager.__new__(TokenManager)
        now = [1000.0]
        manager._clock = lambda: now[0]  # type: ignore[method-assign]
        manager._current = None
        manager._rejected = None
        assert manager.valid() is None
        token = Token(access="a-fast-path-token", obtained_at=990.0, expires_at=2000.0, grant="g")
        manager._current = token
        assert manager.valid() is token
        manager._rejected = token
        assert manager.valid() is None
        manager._rejected = None
        now[0] = 3000.0
        assert manager.valid() is None and token.expired(now[0])

    def test_window_open_matches_wait_window(self) -> None:
        """LocalCoordinator.window_open() is True exactly when wait_window() would say 0."""
        import asyncio

        from broker.coordinator import LocalCoordinator

        now = [100.0]
        coordinator = LocalCoordinator(clock=lambda: now[0])
        for until, clock in [(None, 100.0), (150.0, 100.0), (150.0, 150.0), (150.0, 200.0)]:
            now[0] = clock
            if until is not None:
                asyncio.run(coordinator.set_window("c", until))
            wait = asyncio.run(coordinator.wait_window("c"))
            assert coordinator.window_open("c") is (wait == 0)

    def test_turn_ready_only_without_rate_limit_and_window(self) -> None:
        """Connector.turn_ready(): False under a rate_limit or a window the coordinator knows
        of (any coordinator: a Redis one answers from the windows the fleet pushed to it)."""
        from types import SimpleNamespace

        from broker.coordinator import LocalCoordinator
        from broker.upstream import Connector

        coordinator = LocalCoordinator(clock=lambda: 100.0)
        connector = Connector.__new__(Connector)
        connector.name = "c"
        connector.coordinator = coordinator
        connector.config = SimpleNamespace(rate_limit=None)  # type: ignore[assignment]
        assert connector.turn_ready()
        coordinator._windows["c"] = 200.0
        assert not connector.turn_ready()
        coordinator._windows["c"] = 50.0
        assert connector.turn_ready()
        connector.config = SimpleNamespace(rate_limit=object())  # type: ignore[assignment]
        assert not connector.turn_ready()
        connector.config = SimpleNamespace(rate_limit=None)  # type: ignore[assignment]
        connector.coordinator = SimpleNamespace(window_open=lambda key: key != "c")  # type: ignore[assignment]
        assert not connector.turn_ready()
        connector.coordinator = SimpleNamespace(window_open=lambda key: key == "c")  # type: ignore[assignment]
        assert connector.turn_ready()


class TestStreamBack:
    """Small bodies of known length are answered whole; the rest streams. Same bytes out."""

    @staticmethod
    async def _through(
        method: str, origin_handler: Any
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        import aiohttp
        from aiohttp.test_utils import RawTestServer

        from broker.http1 import Pool
        from broker.proxy import Proxy
        from broker.server import Request, Response, Server

        origin = RawTestServer(origin_handler)
        await origin.start_server()
        session = Pool(
            "127.0.0.1", origin.port, ssl_context=None, limit=4, connect_timeout=5, read_timeout=5
        )

        async def proxy_handler(request: Request) -> Response | None:
            upstream = await session.request(method, "/", [])
            return await Proxy._stream_back(request, upstream, "rid-1")

        proxy = Server(proxy_handler)
        port = await proxy.listen("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as client:
                async with client.request(method, f"http://127.0.0.1:{port}/") as answer:
                    body = await answer.read()
                    return answer.status, list(answer.headers.items()), body
        finally:
            session.close()
            await proxy.shutdown(1.0)
            await origin.close()

    async def test_small_body_headers_and_encoding_untouched(self) -> None:
        import gzip

        from aiohttp import web

        payload = gzip.compress(b'{"auth":"x"}')

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            headers = [
                ("Content-Encoding", "gzip"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("X-Request-ID", "from-origin"),
                ("Content-Type", "application/json"),
            ]
            return web.Response(body=payload, headers=headers)

        status, headers, body = await self._through("GET", origin)
        assert status == 200 and body == payload
        names = [k.lower() for k, _ in headers]
        assert [v for k, v in headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]
        assert dict((k.lower(), v) for k, v in headers)["content-encoding"] == "gzip"
        assert [v for k, v in headers if k.lower() == "x-request-id"] == ["rid-1"]
        assert names.count("content-length") == 1
        assert dict((k.lower(), v) for k, v in headers)["content-length"] == str(len(payload))

    async def test_head_keeps_the_length(self) -> None:
        from aiohttp import web

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=b"x" * 20)

        status, headers, body = await self._through("HEAD", origin)
        assert status == 200 and body == b""
        assert dict((k.lower(), v) for k, v in headers)["content-length"] == "20"

    @pytest.mark.parametrize("code", [204, 304])
    async def test_bodiless_statuses(self, code: int) -> None:
        from aiohttp import web

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(status=code, headers={"ETag": '"e"'})

        status, headers, body = await self._through("GET", origin)
        assert status == code and body == b""
        assert dict((k.lower(), v) for k, v in headers)["etag"] == '"e"'

    @pytest.mark.parametrize("size", [0, 65536, 65537, 300_000])
    async def test_sizes_around_the_limit(self, size: int) -> None:
        from aiohttp import web

        data = bytes(random.getrandbits(8) for _ in range(size))

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            return web.Response(body=data)

        status, _headers, body = await self._through("GET", origin)
        assert status == 200 and body == data

    async def test_unknown_length_streams(self) -> None:
        from aiohttp import web

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"a" * 10)
            await response.write(b"b" * 10)
            await response.write_eof()
            return response

        status, headers, body = await self._through("GET", origin)
        assert status == 200 and body == b"a" * 10 + b"b" * 10
        assert "content-length" not in [k.lower() for k, _ in headers]

    async def test_small_body_broken_off_is_upstream_unreachable(self) -> None:
        """An ERP that closes mid-way through a small body: a 502 broker error, not a crash."""
        from types import SimpleNamespace

        from aiohttp import web
        from aiohttp.test_utils import RawTestServer

        from broker.errors import UpstreamUnreachable
        from broker.http1 import Pool
        from broker.proxy import Proxy

        async def origin(request: web.BaseRequest) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "100"})
            await response.prepare(request)
            await response.write(b"x" * 10)
            assert request.transport is not None
            request.transport.close()
            return response

        server = RawTestServer(origin)
        await server.start_server()
        pool = Pool(
            "127.0.0.1", server.port, ssl_context=None, limit=4, connect_timeout=5, read_timeout=5
        )
        try:
            upstream = await pool.request("GET", "/", [])
            with pytest.raises(UpstreamUnreachable, match="broke off"):
                # Nothing is written before the body is read whole: the method is all it needs.
                request: Any = SimpleNamespace(method="GET")
                await Proxy._stream_back(request, upstream, "rid")
            assert pool.open_connections == 0
        finally:
            pool.close()
            await server.close()


class TestLineWriter:
    """Log lines of one loop iteration go out in one write, in order; none is lost."""

    class Recorder(io.BytesIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: Any) -> int:
            self.writes.append(bytes(data))
            return super().write(data)

    def test_outside_a_loop_each_line_at_once(self) -> None:
        file = self.Recorder()
        writer = logs.LineWriter(file)
        writer.msg(b"one")
        writer.info(b"two")
        assert file.writes == [b"one\n", b"two\n"]

    def test_one_write_per_loop_iteration(self) -> None:
        import asyncio

        file = self.Recorder()
        writer = logs.LineWriter(file)

        async def main() -> list[bytes]:
            for n in range(5):
                writer.msg(f"line {n}".encode())
            before = list(file.writes)
            await asyncio.sleep(0)  # one iteration: the scheduled write runs
            await asyncio.sleep(0)
            writer.msg(b"next")
            return before

        assert asyncio.run(main()) == []
        assert file.writes[0] == b"".join(f"line {n}\n".encode() for n in range(5))
        # The line logged last was written once the loop ran again, or at the latest when
        # the next line came outside a loop.
        writer.msg(b"after")
        assert b"".join(file.writes).endswith(b"next\nafter\n")

    def test_pending_lines_survive_a_closed_loop(self) -> None:
        """A loop closed before its scheduled write: the lines go out with the next one."""
        import asyncio

        file = self.Recorder()
        writer = logs.LineWriter(file)
        loop = asyncio.new_event_loop()

        async def log(line: bytes) -> None:
            writer.msg(line)

        loop.run_until_complete(log(b"a"))
        loop.close()  # the scheduled write may never run on it
        asyncio.run(log(b"b"))
        writer.flush()
        assert b"".join(file.writes) == b"a\nb\n"

    def test_json_logging_uses_it_for_a_binary_stream(self, restore_logging: None) -> None:
        """configure_logging on stdout (a buffered binary stream): lines through LineWriter."""
        raw = self.Recorder()
        stream = io.TextIOWrapper(raw, write_through=True)
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger("test-writer")
        log.info("hello", n=1)
        info_line(log, "request", {"status": 200})
        lines = [orjson.loads(line) for line in b"".join(raw.writes).splitlines()]
        assert [line["event"] for line in lines] == ["hello", "request"]
