"""Fault injection through the simulator against a real broker: 429, 504, IdP failures,
disconnects. Each test asserts what the client saw, what the ERP saw, and the metrics."""

from __future__ import annotations

import asyncio
import email.utils
import time
from pathlib import Path

import aiohttp
import pytest
import structlog
import structlog.testing
import yaml

from broker.app import Broker, BrokerServer
from broker.config import load_config
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, SimStarter, ifs_connector, metric


@pytest.fixture
async def broker(ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory) -> BrokerServer:
    server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
    await server.broker.wait_ready(5)
    return server


class TestRateLimited:
    async def test_retry_after_seconds_is_honoured(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """429 with Retry-After: 1 → the retry reaches the ERP no sooner than 1 s later."""
        ifs_sim.queue_api_response(429, headers={"Retry-After": "1"})
        async with http.post(f"{broker.proxy_url}/ifs/_test/echo/x", data=b"p") as resp:
            assert resp.status == 200
        first, second = ifs_sim.api_requests
        assert second.time - first.time >= 0.95
        assert first.body == second.body == b"p"  # 429: retried for every method
        assert (
            metric(broker, "erp_broker_retries_total", connector="ifs", reason="rate_limited") == 1
        )

    async def test_retry_after_http_date_is_honoured(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """429 with an HTTP-date Retry-After waits until that date."""
        when = email.utils.formatdate(time.time() + 2, usegmt=True)
        ifs_sim.queue_api_response(429, headers={"Retry-After": when})
        async with http.get(f"{broker.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        first, second = ifs_sim.api_requests
        assert second.time - first.time >= 0.9  # the date has one-second resolution

    async def test_concurrent_clients_wait_out_one_window(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """Ten clients during a Retry-After: 2 window cause no ERP request inside the window."""
        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"})
        first = asyncio.create_task(http.get(f"{broker.proxy_url}/ifs/_test/echo/first"))
        await ifs_sim.wait_for_api_requests(1)
        window_start = ifs_sim.api_requests[0].time

        async def one(i: int) -> int:
            async with http.get(f"{broker.proxy_url}/ifs/_test/echo/{i}") as resp:
                return resp.status

        assert await asyncio.gather(*(one(i) for i in range(10))) == [200] * 10
        (await first).release()
        later = ifs_sim.api_requests[1:]
        assert len(later) == 11
        assert min(r.time for r in later) - window_start >= 1.95
        assert metric(broker, "erp_broker_rate_limit_waits_total", connector="ifs") >= 10

    async def test_budget_spent_returns_the_erps_answer(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """After max_retries, the ERP's own 429 (with its Retry-After) goes back unchanged."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, retry={"max_retries": 2, "base_delay": 0.01})}
        )
        ifs_sim.queue_api_response(429, headers={"Retry-After": "0"}, body=b"slow down", count=3)
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "0"
            assert "X-Broker-Error" not in resp.headers
            assert await resp.read() == b"slow down"
        assert len(ifs_sim.api_requests) == 3

    async def test_retry_after_over_max_wait_is_not_waited(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """A Retry-After longer than max_wait (30 s) is passed back at once."""
        ifs_sim.queue_api_response(429, headers={"Retry-After": "120"})
        started = time.monotonic()
        async with http.get(f"{broker.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 429
        assert time.monotonic() - started < 2
        assert len(ifs_sim.api_requests) == 1

    async def test_full_wait_queue_answers_at_once(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """With max_queue waiters already in the window, the next request gets rate_limited now."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, retry={"max_queue": 2})})
        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"})
        # The first request meets the 429 and waits out the window itself; one more fills the queue.
        waiting = [asyncio.create_task(http.get(f"{server.proxy_url}/ifs/_test/echo/first"))]
        await ifs_sim.wait_for_api_requests(1)
        waiting.append(asyncio.create_task(http.get(f"{server.proxy_url}/ifs/_test/echo/second")))
        async with asyncio.timeout(1.5):
            while metric(server, "erp_broker_rate_limit_waits_total", connector="ifs") < 2:
                await asyncio.sleep(0.01)
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/late") as resp:
                assert resp.status == 429
                assert resp.headers["X-Broker-Error"] == "rate_limited"
        for task in waiting:
            (await task).release()


class TestGatewayTimeout:
    async def test_post_after_504_reaches_the_erp_once(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """A POST is never sent twice after a 504: the ERP may have processed it."""
        ifs_sim.queue_api_response(504, body=b"gateway timeout")
        async with http.post(f"{broker.proxy_url}/ifs/_test/echo/x", data=b"order") as resp:
            assert resp.status == 504
            assert "X-Broker-Error" not in resp.headers
        assert len(ifs_sim.api_requests) == 1
        assert (
            metric(broker, "erp_broker_retries_total", connector="ifs", reason="gateway_timeout")
            == 0
        )

    @pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
    async def test_idempotent_request_is_retried(
        self,
        method: str,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """GET, PUT and DELETE are retried after a 504 with backoff."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, retry={"base_delay": 0.05})}
        )
        ifs_sim.queue_api_response(504)
        async with http.request(
            method, f"{server.proxy_url}/ifs/_test/echo/x", data=b"same"
        ) as resp:
            assert resp.status == 200
        assert [r.status for r in ifs_sim.api_requests] == [504, 200]
        assert (
            metric(server, "erp_broker_retries_total", connector="ifs", reason="gateway_timeout")
            == 1
        )


class TestIdentityProviderFaults:
    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (503, b"down"),
            (200, b""),
            (200, b'{"token_type": "Bearer"}'),
            (200, b"<html>proxy error</html>"),
        ],
    )
    async def test_expired_token_and_broken_idp_answer_auth_failed_fast(
        self,
        status: int,
        body: bytes,
        start_sim: SimStarter[IfsApps10Sim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Once the token expired and the IdP answers garbage, requests get auth_failed quickly."""
        sim = await start_sim(IfsApps10Sim(token_lifetime=1))
        server = await make_broker({"ifs": ifs_connector(sim, ca_file, token_timeout=3)})
        await server.broker.wait_ready(5)
        sim.queue_token_response(status, body=body, count=1000)
        sim.expire_all_tokens()
        started = time.monotonic()
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 502
            assert resp.headers["X-Broker-Error"] == "auth_failed"
        assert time.monotonic() - started < 3
        # Backoff, not a tight loop: a handful of token requests, not hundreds.
        assert sim.count_token_requests() < 10
        failures = sum(
            metric(
                server,
                "erp_broker_token_requests_total",
                connector="ifs",
                grant=grant,
                outcome="failure",
            )
            for grant in ("password", "refresh_token")
        )
        assert failures >= 1

    async def test_token_with_a_line_break_is_refused_not_injected(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """An access token holding CR/LF would add headers to every request: refused when issued."""
        ifs_sim.queue_token_response(
            200, body=b'{"access_token": "abc\\r\\nX-Evil: 1", "expires_in": 300}', count=1000
        )
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, token_timeout=3)})
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 502
            assert resp.headers["X-Broker-Error"] == "auth_failed"
            assert "control characters" in (await resp.json())["error"]["message"]
        assert ifs_sim.api_requests == []

    async def test_slow_idp_never_hangs_a_request(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A token endpoint slower than token_timeout: auth_failed within the timeout."""
        ifs_sim.token_delay = 5
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, token_timeout=0.5)})
        started = time.monotonic()
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 502
            assert "0.5s" in (await resp.json())["error"]["message"]
        assert time.monotonic() - started < 2


class TestDisconnects:
    async def test_client_gone_during_a_window_stops_its_retries(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim
    ) -> None:
        """A client that disconnects while its request waits out a 429 window is not retried."""
        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as impatient:
            with pytest.raises(asyncio.TimeoutError):
                await impatient.get(f"{broker.proxy_url}/ifs/_test/echo/x")
        proxy = broker.broker.proxy
        assert proxy is not None
        async with asyncio.timeout(2):
            await proxy.idle.wait()  # the handler was cancelled, not left sleeping
        assert len(ifs_sim.api_requests) == 1

    async def test_client_gone_mid_stream_leaks_nothing(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim
    ) -> None:
        """Closing a 64 MiB download early ends the upstream call; no handler stays behind."""
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"{broker.proxy_url}/ifs/_test/bytes/{64 * 1024 * 1024}")
            await resp.content.readexactly(1024 * 1024)
            resp.close()
        proxy = broker.broker.proxy
        assert proxy is not None
        async with asyncio.timeout(3):
            await proxy.idle.wait()
        assert metric(broker, "erp_broker_inflight_requests", connector="ifs") == 0
        pool = broker.broker.connectors["ifs"].pool
        # The half-read upstream connection was closed, not returned to the pool.
        assert pool.idle_connections == 0 and pool.open_connections == 0


class TestBrokenAnswers:
    async def test_small_answer_broken_off_is_a_502(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """An ERP that dies in the middle of a small answer: a JSON 502, the broker serves on."""
        async with http.get(f"{broker.proxy_url}/ifs/_test/broken/1000") as resp:
            assert resp.status == 502
            assert resp.headers["X-Broker-Error"] == "upstream_unreachable"
            assert "broke off" in (await resp.json())["error"]["message"]
        async with http.get(f"{broker.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200

    async def test_streamed_answer_broken_off_closes_the_connection(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Once the head is out, the app learns of a broken-off body by the connection closing
        before the announced length; logged as a broker error, not as a broker failure."""
        with structlog.testing.capture_logs() as logs:
            async with http.get(f"{broker.proxy_url}/ifs/_test/broken/{4 * 1024 * 1024}") as resp:
                assert resp.status == 200 and resp.content_length == 4 * 1024 * 1024
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            proxy = broker.broker.proxy
            assert proxy is not None
            async with asyncio.timeout(3):
                await proxy.idle.wait()
        events = [line["event"] for line in logs]
        assert "broker_error" in events and "handler_failed" not in events
        async with http.get(f"{broker.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200


class TestRotatedSecret:
    async def test_new_password_in_the_secret_file_is_picked_up(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str, http: aiohttp.ClientSession
    ) -> None:
        """Paused after a rejected password, the broker logs in once the mounted file changes."""
        secret = tmp_path / "password"
        secret.write_text("old-password\n")
        config_file = tmp_path / "broker.yaml"
        config_file.write_text(
            yaml.safe_dump(
                {
                    "listen": "127.0.0.1:0",
                    "admin_listen": "127.0.0.1:0",
                    "store": {"sqlite": str(tmp_path / "tokens.db")},
                    "credentials_reload_interval": 0.1,
                    "connectors": {
                        "ifs": ifs_connector(ifs_sim, ca_file, password=f"${{file:{secret}}}")
                    },
                }
            )
        )
        server = BrokerServer(Broker(load_config(config_file)))
        await server.start()
        try:
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
                assert resp.headers["X-Broker-Error"] in ("auth_failed", "connector_unavailable")
            assert server.broker.connectors["ifs"].tokens.status()["token_state"] == "paused"
            secret.write_text(ifs_sim.password + "\n")
            await server.broker.wait_ready(5)
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
                assert resp.status == 200
            assert [r.status for r in ifs_sim.token_requests] == [401, 200]
        finally:
            await server.stop()


class TestWaitsChargedToTheBudget:
    """Every second a request waits -- out a window it found, its own 429's, one made longer
    meanwhile -- is charged to its retry budget: ``max_total`` bounds what it waits in all."""

    @staticmethod
    async def _budget_broker(
        sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory, max_total: float
    ) -> BrokerServer:
        server = await make_broker(
            {"ifs": ifs_connector(sim, ca_file, retry={"max_total": max_total})}
        )
        await server.broker.wait_ready(5)
        return server

    @staticmethod
    async def _open_window(server: BrokerServer, seconds: float) -> None:
        """A window as another replica's (or another request's) 429 opens it: through the
        coordinator every request of the connector asks."""
        await server.broker.coordinator.set_window("ifs", time.time() + seconds)

    async def test_window_longer_than_the_budget_is_refused_at_once(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A request that comes while a 30 s window is open, with max_total 2: 429 rate_limited
        at once, naming retry.max_total; the ERP sees nothing of it, nothing is waited."""
        server = await self._budget_broker(ifs_sim, ca_file, make_broker, 2)
        await self._open_window(server, 30)
        async with asyncio.timeout(5), http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 429
            assert resp.headers["X-Broker-Error"] == "rate_limited"
            message = (await resp.json())["error"]["message"]
        assert "retry.max_total" in message and "window" in message
        assert ifs_sim.api_requests == []
        assert (
            metric(
                server, "erp_broker_backoff_seconds_total", connector="ifs", reason="rate_limited"
            )
            == 0
        )
        assert (
            metric(server, "erp_broker_retries_total", connector="ifs", reason="rate_limited") == 0
        )

    async def test_window_within_the_budget_is_waited_and_charged(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A 1 s window found on arrival is waited out (200) and its seconds counted; a 2 s one
        is too, and charged: the request's own 429 asking 2 s more (2 + 2 > max_total 3) then
        goes back as the ERP sent it, not retried."""
        server = await self._budget_broker(ifs_sim, ca_file, make_broker, 3)

        def waited() -> float:
            return metric(
                server, "erp_broker_backoff_seconds_total", connector="ifs", reason="rate_limited"
            )

        await self._open_window(server, 1)
        async with asyncio.timeout(10), http.get(f"{server.proxy_url}/ifs/_test/echo/a") as resp:
            assert resp.status == 200
        first = waited()
        assert 0.5 <= first <= 3
        assert [r.status for r in ifs_sim.api_requests] == [200]

        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"}, body=b"slow down")
        await self._open_window(server, 2)
        async with asyncio.timeout(10), http.get(f"{server.proxy_url}/ifs/_test/echo/b") as resp:
            assert resp.status == 429
            assert "X-Broker-Error" not in resp.headers
            assert resp.headers["Retry-After"] == "2"
            assert await resp.read() == b"slow down"
        assert 1.5 <= waited() - first <= 3
        assert [r.status for r in ifs_sim.api_requests] == [200, 429]
        assert (
            metric(server, "erp_broker_retries_total", connector="ifs", reason="rate_limited") == 0
        )
        assert metric(server, "erp_broker_rate_limit_waits_total", connector="ifs") == 2

    async def test_waits_never_exceed_max_total_when_the_window_grows(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """max_total 3: a 429 with Retry-After: 2, then, while the request waits, others make
        the window 4 s longer. It stops at its budget (rate_limited), having waited at most 3 s
        by the broker's own count, and never reaches the ERP again."""
        server = await self._budget_broker(ifs_sim, ca_file, make_broker, 3)
        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"})
        request = asyncio.create_task(http.get(f"{server.proxy_url}/ifs/_test/echo/x"))
        async with asyncio.timeout(5):
            while metric(server, "erp_broker_rate_limit_waits_total", connector="ifs") < 1:
                await asyncio.sleep(0.01)
        await self._open_window(server, 4)
        async with asyncio.timeout(15):
            resp = await request
        async with resp:
            assert resp.status == 429
            assert resp.headers["X-Broker-Error"] == "rate_limited"
        waited = metric(
            server, "erp_broker_backoff_seconds_total", connector="ifs", reason="rate_limited"
        )
        assert 1.5 <= waited <= 3 + 0.5  # the budget, plus a loaded machine's late wake-up
        assert [r.status for r in ifs_sim.api_requests] == [429]
        assert (
            metric(server, "erp_broker_retries_total", connector="ifs", reason="rate_limited") == 1
        )
