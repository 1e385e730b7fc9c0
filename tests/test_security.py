"""Adversarial tests: a closed proxy, smuggling refused at the parser, size limits, the admin
guard, secrets that never show. Property-based tests drive a broker running in a thread."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from broker.admin import Forbidden, _require_operator
from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.routes import AdminRequest
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector


class LoopThread:
    """An event loop in a thread, for sync (hypothesis) tests against async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Target:
    def __init__(self, sim: IfsApps10Sim, server: BrokerServer) -> None:
        self.sim = sim
        self.server = server


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, server_ssl: ssl.SSLContext, ca_file: str
) -> Iterator[Target]:
    """A simulator and a broker whose /ifs/ route forwards to the simulator's echo route."""
    thread = LoopThread()
    store = tmp_path_factory.mktemp("sec") / "tokens.db"

    async def start() -> Target:
        sim = IfsApps10Sim()
        await sim.start(ssl_context=server_ssl)
        token_url = f"{sim.url}/auth/realms/{sim.realm}/protocol/openid-connect/token"
        config = parse_config(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "store": {"sqlite": str(store)},
                "access_log": False,
                "connectors": {
                    "ifs": ifs_connector(
                        sim, ca_file, base_url=f"{sim.url}/_test/echo", token_url=token_url
                    )
                },
            }
        )
        server = BrokerServer(Broker(config))
        await server.start()
        await server.broker.wait_ready(10)
        return Target(sim, server)

    async def stop(t: Target) -> None:
        await t.server.stop()
        await t.sim.stop()

    t = thread.run(start())
    yield t
    thread.run(stop(t))
    thread.close()


def send(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Raw bytes in, (status, headers, body) out."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            raw = b"".join(chunks)
            head, sep, body = raw.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                length = int(headers.get("content-length", "-1"))
                if length >= 0 and len(body) >= length:
                    return int(lines[0].split()[1]), headers, body[:length]
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    return int(lines[0].split()[1]), headers, body


def get(target: Target, path: str, extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n".encode("latin-1")
        + extra
        + b"\r\n"
    )
    return send(target.server.proxy_port, request)


def is_dot_segment_path(path: str) -> bool:
    for _ in range(5):
        if any(seg in (".", "..") for seg in path.replace("\\", "/").split("/")):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


SEGMENT = st.lists(
    st.sampled_from(
        [
            "a",
            "B",
            ".",
            "..",
            "%2e",
            "%2E",
            "%252e",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "~",
            "-",
            "_",
            "'",
            "(",
            ")",
            "=",
            ",",
            "%20",
            "$",
            "%25",
            "x.y",
            ";",
            "@",
            ":",
        ]
    ),
    min_size=0,
    max_size=5,
).map("".join)
QUERY = st.text(alphabet="abcXYZ=&$%'()/,.2fE~-_+:@", max_size=40)


class TestClosedProxy:
    @settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(segments=st.lists(SEGMENT, min_size=1, max_size=5), query=QUERY)
    def test_forwards_exactly_within_the_route_or_refuses(
        self, target: Target, segments: list[str], query: str
    ) -> None:
        """Any target under /ifs/ is either forwarded byte for byte below the route's base, or
        refused with a broker error that never reached the ERP; nothing else."""
        rest = "/".join(segments)
        raw = f"/ifs/{rest}" + (f"?{query}" if query else "")
        before = len(target.sim.api_requests)
        status, headers, body = get(target, raw)
        if is_dot_segment_path(f"/ifs/{rest}"):
            assert status == 400 and headers.get("x-broker-error") == "bad_request"
            assert len(target.sim.api_requests) == before
            return
        if status == 200:
            echoed = orjson.loads(body)
            assert echoed["raw_path"] == f"/_test/echo/{rest}" + (f"?{query}" if query else "")
        else:
            # Only the sandbox's own 404 for odd echo tails, or a broker refusal.
            assert status in (400, 404), (status, body)
            if status == 400:
                assert len(target.sim.api_requests) == before

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        names=st.lists(
            st.sampled_from(
                [
                    "Authorization",
                    "authorization",
                    "AUTHORIZATION",
                    "apiKey",
                    "APIKEY",
                    "apikey",
                    "Proxy-Authorization",
                    "X-Custom",
                    "Cookie",
                ]
            ),
            min_size=1,
            max_size=6,
        ),
        value=st.text(alphabet="abcdefXYZ0123456789-._~+/=", min_size=8, max_size=30),
    )
    def test_app_credentials_never_reach_the_erp(
        self, target: Target, names: list[str], value: str
    ) -> None:
        """Whatever case or repetition, app-sent credential headers are dropped or replaced."""
        extra = "".join(f"{name}: app-{value}\r\n" for name in names).encode()
        status, _, body = get(target, "/ifs/h", extra)
        assert status == 200
        forwarded = orjson.loads(body)["headers"]
        auth = [v for k, v in forwarded if k.lower() == "authorization"]
        assert len(auth) == 1 and auth[0].startswith("Bearer ") and "app-" not in auth[0]
        for k, v in forwarded:
            if k.lower() in ("apikey", "proxy-authorization"):
                pytest.fail(f"{k} was forwarded")
            if k.lower() == "x-custom":
                assert v == f"app-{value}"

    @pytest.mark.parametrize(
        "request_bytes",
        [
            b"POST /ifs/x HTTP/1.1\r\nHost: b\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /ifs/x HTTP/1.1\r\nHost: b\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            b"POST /ifs/x HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            b"POST /ifs/x HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            b"GET /ifs/x HTTP/1.1\r\nHost: b\r\nX-A: a\r\n folded\r\n\r\n",
            b"GET /ifs/x HTTP/1.1\r\nHost: b\r\nX-A: a\rInjected: 1\r\n\r\n",
            b"GET /ifs/x HTTP/1.1\r\nHost: b\r\nX-A: a\x00b\r\n\r\n",
            b"GET /ifs/x HTTP/1.1\nHost: b\n\n",
            b"GET /ifs/x HTTP/1.1\r\nHost: b\r\nX-A : b\r\n\r\n",
        ],
        ids=[
            "cl+te",
            "two-cl",
            "te-list",
            "te-unknown",
            "obs-fold",
            "cr-in-value",
            "nul",
            "bare-lf",
            "space-colon",
        ],
    )
    def test_smuggling_inputs_get_400_and_never_reach_the_erp(
        self, target: Target, request_bytes: bytes
    ) -> None:
        """Conflicting framing, obs-fold and CR/LF/NUL in headers are refused by the parser."""
        before = len(target.sim.api_requests)
        status, headers, body = send(target.server.proxy_port, request_bytes)
        assert status == 400
        assert headers["x-broker-error"] == "bad_request"
        assert orjson.loads(body)["error"]["code"] == "bad_request"
        assert len(target.sim.api_requests) == before

    def test_long_request_line_is_414(self, target: Target) -> None:
        """A request line over 8 KiB: 414 with a JSON error."""
        status, headers, _ = get(target, "/ifs/" + "a" * 9000)
        assert status == 414 and headers["x-broker-error"] == "uri_too_long"

    def test_long_header_is_431(self, target: Target) -> None:
        """A header field over 8 KiB: 431."""
        status, headers, _ = get(target, "/ifs/x", b"X-Big: " + b"b" * 9000 + b"\r\n")
        assert status == 431 and headers["x-broker-error"] == "header_too_large"

    def test_too_many_headers_is_431(self, target: Target) -> None:
        """More header fields than the parser allows: 431."""
        status, _, _ = get(target, "/ifs/x", b"".join(b"X-%d: 1\r\n" % i for i in range(300)))
        assert status == 431


class TestAdminGuard:
    def _request(
        self, server: BrokerServer, peer: str, headers: dict[str, str] | None = None
    ) -> Any:
        return AdminRequest(
            server,
            "POST",
            "/connectors/ifs/refresh",
            CIMultiDictProxy(CIMultiDict(headers or {})),
            peer,
            match_info={"name": "ifs"},
        )

    def _server(self, **top: Any) -> BrokerServer:
        config = parse_config(
            {
                "connectors": {
                    "ifs": {
                        "type": "ifs_apps10",
                        "domain": "e.example",
                        "realm": "r",
                        "client_id": "c",
                        "client_secret": "s",
                        "username": "u",
                        "password": "p",
                    }
                },
                **top,
            }
        )
        return BrokerServer(Broker(config))

    def test_actions_only_from_loopback_without_a_token(self) -> None:
        """Without admin_token, a non-loopback peer is refused; loopback is allowed."""
        server = self._server()
        _require_operator(self._request(server, "127.0.0.1"))
        _require_operator(self._request(server, "::1"))
        with pytest.raises(Forbidden):
            _require_operator(self._request(server, "10.1.2.3"))

    def test_admin_token_is_required_when_configured(self) -> None:
        """With admin_token, only the right bearer passes, from anywhere."""
        server = self._server(admin_token="admin-token-value")
        _require_operator(
            self._request(server, "10.1.2.3", {"Authorization": "Bearer admin-token-value"})
        )
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(Forbidden) as info:
                _require_operator(self._request(server, "127.0.0.1", headers))
            assert "admin-token-value" not in str(info.value)


class TestTls:
    async def test_tls_verify_false_is_warned_and_shown(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """tls_verify: false works, logs a warning naming the connector, and shows on /connectors."""
        import aiohttp

        with capture_logs() as logs:
            server = await make_broker({"plain": ifs_connector(ifs_sim, None, tls_verify=False)})  # type: ignore[arg-type]
        assert any(
            e["event"] == "tls_verification_disabled" and e["connector"] == "plain" for e in logs
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.proxy_url}/plain/_test/echo/x") as resp:
                assert resp.status == 200
            async with http.get(f"{server.admin_url}/connectors") as resp:
                assert (await resp.json())["plain"]["tls_verify"] is False
