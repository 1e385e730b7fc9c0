"""Credential lifecycle through a real broker and the IFS Apps 10 simulator."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, SimStarter, ifs_connector, metric


class TestColdStart:
    async def test_200_concurrent_requests_one_token_request(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A burst at a cold start waits for one login; every request succeeds."""
        ifs_sim.token_delay = 0.3
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})

        async def one(i: int) -> int:
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/{i}") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        assert ifs_sim.count_token_requests() == 1
        assert (
            metric(
                server,
                "erp_broker_token_requests_total",
                connector="ifs",
                grant="password",
                outcome="success",
            )
            == 1
        )
        assert (
            metric(server, "erp_broker_requests_total", connector="ifs", method="GET", status="200")
            == 200
        )


class TestRejectedCredential:
    async def test_401_refreshes_once_and_replays_the_post(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """One 401: one refresh, and the POST is replayed with an identical body and the new token."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/warm") as resp:
            assert resp.status == 200
        ifs_sim.queue_api_response(
            401, body={"error": {"code": "ODP_UNAUTHORIZED", "message": "expired"}}
        )
        payload = b'{"CustomerId": "10/7", "Name": "a b"}' * 100
        async with http.post(f"{server.proxy_url}/ifs/_test/echo/post", data=payload) as resp:
            assert resp.status == 200
            body = await resp.json()
        first, second = ifs_sim.api_requests[-2:]
        assert first.status == 401 and second.status == 200
        assert first.body == second.body == payload
        assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
        assert first.credential != second.credential
        assert ifs_sim.count_token_requests("refresh_token") == 1
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="auth") == 1

    async def test_burst_of_401s_causes_one_refresh(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """All tokens revoked under load: 30 concurrent 401s lead to exactly one refresh."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/warm") as resp:
            assert resp.status == 200
        ifs_sim.expire_all_tokens()
        ifs_sim.token_delay = 0.2

        async def one(i: int) -> int:
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/{i}") as resp:
                return resp.status

        assert await asyncio.gather(*(one(i) for i in range(30))) == [200] * 30
        assert ifs_sim.count_token_requests() == 2  # the login and one refresh

    async def test_second_401_goes_back_as_it_came(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """If the replay is refused too, the ERP's 401 goes to the app unchanged."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        ifs_sim.queue_api_response(
            401, headers={"WWW-Authenticate": "Bearer"}, body=b"first", count=1
        )
        ifs_sim.queue_api_response(
            401, headers={"WWW-Authenticate": "Bearer"}, body=b"second", count=1
        )
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 401
            assert await resp.read() == b"second"
            assert "X-Broker-Error" not in resp.headers
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        assert len(ifs_sim.api_requests) == 2

    async def test_body_over_the_replay_limit_is_not_replayed(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A body larger than replay_max_bytes streams once; its 401 goes back to the app."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, replay_max_bytes=1024)})
        ifs_sim.queue_api_response(401, body=b"denied")
        async with http.post(f"{server.proxy_url}/ifs/_test/upload", data=b"x" * 4096) as resp:
            assert resp.status == 401
        assert len(ifs_sim.api_requests) == 1

    async def test_extra_rejection_status(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A status listed in auth_failure_statuses is treated like a 401."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, auth_failure_statuses=[419])}
        )
        ifs_sim.queue_api_response(419, body=b"session gone")
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        assert ifs_sim.count_token_requests("refresh_token") == 1

    async def test_dead_refresh_token_falls_back_to_password(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Refresh answered 400 invalid_grant: a password login follows, the request succeeds."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/warm") as resp:
            assert resp.status == 200
        ifs_sim.revoke_refresh_tokens()
        ifs_sim.expire_all_tokens()
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        grants = [r.grant for r in ifs_sim.token_requests]
        assert grants == ["password", "refresh_token", "password"]
        assert [r.status for r in ifs_sim.token_requests] == [200, 400, 200]


class TestWrongCredentials:
    async def test_auth_failed_then_connector_unavailable(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Wrong password: auth_failed, then connector_unavailable; one login attempt; not ready."""
        conn = ifs_connector(ifs_sim, ca_file, password="wrong-password")
        server = await make_broker({"ifs": conn})
        codes = []
        for _ in range(6):
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
                body = await resp.json()
                codes.append((resp.status, resp.headers["X-Broker-Error"]))
                assert "wrong-password" not in str(body)
        assert codes[0] in ((502, "auth_failed"), (503, "connector_unavailable"))
        assert codes[1:] == [(503, "connector_unavailable")] * 5
        assert "check username and password" in body["error"]["message"]
        assert ifs_sim.count_token_requests() == 1
        async with http.get(f"{server.admin_url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["connectors"]["ifs"]["token_state"] == "paused"
        assert metric(server, "erp_broker_connector_up", connector="ifs") == 0
        assert metric(server, "erp_broker_login_paused", connector="ifs") == 1


class TestRefreshAhead:
    async def test_token_is_refreshed_before_expiry_without_requests(
        self,
        start_sim: SimStarter[IfsApps10Sim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """With 2 s tokens, the broker refreshes in the background; requests never see expiry."""
        sim = await start_sim(IfsApps10Sim(token_lifetime=2))
        server = await make_broker({"ifs": ifs_connector(sim, ca_file)})
        await sim.wait_for_token_requests(3, timeout=6)
        assert [r.grant for r in sim.token_requests[:3]] == [
            "password",
            "refresh_token",
            "refresh_token",
        ]
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        assert metric(server, "erp_broker_token_expiry_timestamp_seconds", connector="ifs") > 0


class TestPersistence:
    async def test_restart_on_the_same_file_needs_no_login(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A second broker on the same SQLite file uses the stored token: no new token request."""
        conn = ifs_connector(ifs_sim, ca_file)
        first = await make_broker({"ifs": conn})
        async with http.get(f"{first.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        await first.stop()
        second = await make_broker({"ifs": conn})
        async with http.get(f"{second.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        assert ifs_sim.count_token_requests() == 1

    async def test_rotated_password_does_not_reuse_old_tokens(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Tokens are keyed by the credentials' content: a new password logs in afresh."""
        first = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{first.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        await first.stop()
        ifs_sim.password = "rotated-password"
        second = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{second.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        assert ifs_sim.count_token_requests("password") == 2


class TestAdmin:
    async def test_health_ready_connectors_metrics(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """The admin endpoints answer, and none shows a secret or token."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
        token = ifs_sim.api_requests[-1].credential
        assert token
        texts = []
        for path in ("/healthz", "/readyz", "/connectors", "/connectors/ifs", "/metrics"):
            async with http.get(f"{server.admin_url}{path}") as resp:
                assert resp.status == 200, path
                texts.append(await resp.text())
        everything = "".join(texts)
        for secret in (ifs_sim.password, ifs_sim.client_secret, token):
            assert secret not in everything
        assert "erp_broker_requests_total" in texts[-1]
        assert '"token_state": "valid"' in texts[2]

    async def test_admin_refresh(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """POST /connectors/<name>/refresh makes one token request."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        async with http.post(f"{server.admin_url}/connectors/ifs/refresh") as resp:
            assert resp.status == 200
        assert ifs_sim.count_token_requests() == 2
        async with http.post(f"{server.admin_url}/connectors/nope/refresh") as resp:
            assert resp.status == 404

    async def test_listeners_are_separate(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """/metrics is not on the proxy port, and routes are not on the admin port."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.proxy_url}/metrics") as resp:
            assert resp.status == 404 and resp.headers["X-Broker-Error"] == "no_route"
        async with http.get(f"{server.admin_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 404
        assert ifs_sim.api_requests == []


@pytest.mark.parametrize("status", [500, 503])
async def test_token_endpoint_down_keeps_valid_token(
    status: int,
    ifs_sim: IfsApps10Sim,
    ca_file: str,
    make_broker: BrokerFactory,
    http: aiohttp.ClientSession,
) -> None:
    """While the token is valid, a failing token endpoint does not affect requests."""
    server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
    await server.broker.wait_ready(5)
    ifs_sim.queue_token_response(status, count=5)
    async with http.post(f"{server.admin_url}/connectors/ifs/refresh") as resp:
        assert resp.status == 502
    async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
        assert resp.status == 200


class TestTokenRetriesCounted:
    """The token manager's second tries come from retry.py's policy and are counted in
    ``erp_broker_retries_total`` like the send loop's."""

    async def test_refresh_rejected_then_login_is_one_auth_retry(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A refresh answered invalid_grant is followed by one login: one auth retry."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="auth") == 0
        ifs_sim.revoke_refresh_tokens()
        async with http.post(f"{server.admin_url}/connectors/ifs/refresh") as resp:
            assert resp.status == 200
        assert [r.grant for r in ifs_sim.token_requests] == [
            "password",
            "refresh_token",
            "password",
        ]
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="auth") == 1
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="transient") == 0

    async def test_token_request_after_a_transient_failure_is_a_transient_retry(
        self, ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory
    ) -> None:
        """The token endpoint answers 503 once: the login that follows, after the policy's
        backoff, is one transient retry."""
        ifs_sim.queue_token_response(503, body={"error": "unavailable"})
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await ifs_sim.wait_for_token_requests(2, timeout=10)
        await server.broker.wait_ready(10)
        assert [r.status for r in ifs_sim.token_requests] == [503, 200]
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="transient") == 1
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="auth") == 0
