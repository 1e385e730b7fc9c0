"""The proxy listener inside a real broker (a real simulator, a raw client socket): the
``client_timeouts`` config reaches it, its refusals are the broker's JSON errors, and a client
that leaves before its answer is counted as 499 (nginx's "client closed request") in
``erp_broker_requests_total`` and the access log, never as a 5xx that would feed the
error-ratio alert."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.config import parse_config
from broker.errors import ConfigError
from broker.sandbox import IfsApps10Sim

from ..conftest import BrokerFactory, ifs_connector, metric, offline_pso_connector
from .test_server import LIMIT, Client, assert_refused, until


class TestClientGone:
    async def test_leaving_mid_request_is_499(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """The client closes while the ERP is still answering: the handler stops, the
        access line and the request counter say 499, no 5xx is counted."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        proxy = server.broker.proxy
        assert proxy is not None
        with capture_logs() as logs:
            async with asyncio.timeout(LIMIT * 3):
                client = await Client.connect(server.proxy_port)
                await client.send(b"GET /ifs/_test/slow/30 HTTP/1.1\r\nHost: x\r\n\r\n")
                await until(lambda: proxy.inflight == 1)
                client.close()
                await until(lambda: proxy.inflight == 0)
        lines = [line for line in logs if line["event"] == "request"]
        assert [line["status"] for line in lines] == [499]
        labels = {"connector": "ifs", "method": "GET"}
        assert metric(server, "erp_broker_requests_total", status="499", **labels) == 1
        assert metric(server, "erp_broker_requests_total", status="500", **labels) == 0


class TestClientTimeoutsConfig:
    def test_defaults_and_overrides(self) -> None:
        """``client_timeouts`` defaults to nginx's 60 s each; a key given replaces one."""
        base: dict[str, Any] = {
            "connectors": {
                "x": {
                    "type": "ifs_pso",
                    "base_url": "https://e",
                    "account_id": "a",
                    "username": "u",
                    "password": "p",
                }
            }
        }
        timeouts = parse_config(base).client_timeouts
        assert (timeouts.header, timeouts.body, timeouts.write) == (60, 60, 60)
        timeouts = parse_config({**base, "client_timeouts": {"body": 5}}).client_timeouts
        assert (timeouts.header, timeouts.body, timeouts.write) == (60, 5, 60)
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "client_timeouts": {"write": 0, "linger": 1}})
        text = str(info.value)
        assert "client_timeouts.write" in text and "client_timeouts.linger" in text

    async def test_header_timeout_reaches_the_listener(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """A broker with ``client_timeouts.header: 0.3``: a head that stops half-way is
        answered with the broker's JSON 408 ``request_timeout`` and the connection closed."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, client_timeouts={"header": 0.3}
        )
        async with asyncio.timeout(LIMIT):
            client = await Client.connect(server.proxy_port)
            try:
                await client.send(b"GET /ifs/_test/echo/x HTTP/1.1\r\nHost: x\r\nX-Half")
                assert_refused(await client.response(), 408, "request_timeout")
                assert await client.rest() == b""
            finally:
                client.close()

    async def test_stalled_upload_is_408_in_the_log(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """An upload that stalls (``client_timeouts.body: 0.3``): the app gets the broker's
        JSON 408, the access line and the request counter say 408, not 500."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, client_timeouts={"body": 0.3}
        )
        proxy = server.broker.proxy
        assert proxy is not None
        with capture_logs() as logs:
            async with asyncio.timeout(LIMIT):
                client = await Client.connect(server.proxy_port)
                try:
                    await client.send(
                        b"POST /ifs/_test/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                        + b"u" * 10
                    )
                    assert_refused(await client.response(), 408, "request_timeout")
                finally:
                    client.close()
                await until(lambda: proxy.inflight == 0)
        assert [line["status"] for line in logs if line["event"] == "request"] == [408]
        labels = {"connector": "ifs", "method": "POST"}
        assert metric(server, "erp_broker_requests_total", status="408", **labels) == 1


class TestKeepaliveAndLingeringConfig:
    def test_defaults_overrides_and_bad_values(self) -> None:
        """``client_timeouts.keepalive`` (75 s) and ``.lingering`` (10 s): given, they
        replace the default; 0 or less is refused at check time, naming the key."""
        base: dict[str, Any] = {"connectors": {"x": offline_pso_connector()}}
        timeouts = parse_config(base).client_timeouts
        assert (timeouts.keepalive, timeouts.lingering) == (75, 10)
        given = {"keepalive": 5, "lingering": 2.5}
        timeouts = parse_config({**base, "client_timeouts": given}).client_timeouts
        assert (timeouts.keepalive, timeouts.lingering, timeouts.header) == (5, 2.5, 60)
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "client_timeouts": {"keepalive": 0, "lingering": -1}})
        text = str(info.value)
        assert "client_timeouts.keepalive" in text and "client_timeouts.lingering" in text

    async def test_keepalive_closes_idle_connections_on_both_listeners(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """``client_timeouts.keepalive: 0.3``: a connection left idle after its answer is
        closed by the broker, on the proxy listener and on the admin listener alike."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, client_timeouts={"keepalive": 0.3}
        )
        await server.broker.wait_ready(LIMIT)
        for port, path in (
            (server.proxy_port, "/ifs/_test/echo/x"),
            (server.admin_port, "/healthz"),
        ):
            async with asyncio.timeout(LIMIT):
                client = await Client.connect(port)
                try:
                    await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    answer = await client.response()
                    assert answer.status == 200 and answer.get("Connection") is None
                    assert await client.rest() == b""  # closed by the broker, idle
                finally:
                    client.close()

    async def test_lingering_ends_on_the_admin_listener(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """``client_timeouts.lingering: 0.3``: an admin answer sent before a large body
        arrived closes the connection lingering; a client that goes on sending is cut off
        once the lingering time is over, not after the default 10 s."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, client_timeouts={"lingering": 0.3}
        )
        async with asyncio.timeout(LIMIT):
            client = await Client.connect(server.admin_port)
            try:
                await client.send(
                    b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
                )
                answer = await client.response()
                assert answer.status == 405 and answer.get("Connection") == "close"
                with pytest.raises(OSError):
                    for _ in range(int(LIMIT / 0.05)):  # a trickle, bounded by the limit
                        await client.send(b"x" * 1024)
                        await asyncio.sleep(0.05)
            finally:
                client.close()
