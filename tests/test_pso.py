"""IFS PSO through a real broker and the PSO Gateway simulator (HTTPS on loopback)."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest

from broker.sandbox import PsoSim
from broker.sandbox.ifs_pso import PSO_BASE

from .conftest import BrokerFactory, pso_connector

ROUTE = "/pso" + PSO_BASE


async def get_json(
    http: aiohttp.ClientSession, url: str, **kwargs: object
) -> tuple[int, dict[str, object]]:
    async with http.get(url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.json()


class TestSessionLogin:
    async def test_exact_login_fields_and_apikey(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """The login posts exactly accountId/userName/password as a form; apiKey carries the session."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        status, body = await get_json(http, f"{server.proxy_url}{ROUTE}/data")
        assert status == 200 and "dsScheduleData" in body
        [login] = pso_sim.token_requests
        assert login.grant == "session" and login.status == 200
        assert login.form == {
            "accountId": pso_sim.account_id,
            "userName": pso_sim.username,
            "password": pso_sim.password,
        }
        assert login.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
        call = pso_sim.api_requests[-1]
        assert call.credential and call.headers["apiKey"] == call.credential
        assert "Authorization" not in call.headers

    async def test_app_sent_apikey_is_replaced(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """An apiKey the app sends never reaches PSO: the broker's session replaces it."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        status, body = await get_json(
            http,
            f"{server.proxy_url}/pso/_test/echo/x",
            headers={"apiKey": "app-key", "APIKEY": "other"},
        )
        assert status == 200
        keys = [v for k, v in body["headers"] if k.lower() == "apikey"]  # type: ignore[union-attr]
        assert keys == [body["credential"]] and keys != ["app-key"]

    async def test_no_lifetime_means_kept_until_rejected(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """Without session_ttl the session has no expiry: many calls, one login."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        for _ in range(5):
            status, _ = await get_json(http, f"{server.proxy_url}{ROUTE}/resource")
            assert status == 200
        assert pso_sim.count_token_requests("session") == 1
        status, info = await get_json(http, f"{server.admin_url}/connectors/pso")
        assert info["expires_at"] is None and info["lifetime_source"] == "none"
        assert info["has_refresh_token"] is False

    async def test_rejected_session_logs_in_once_and_replays(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """PSO forgets the session (401): one new login, the POST is replayed with the new apiKey."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        status, _ = await get_json(http, f"{server.proxy_url}{ROUTE}/data")
        assert status == 200
        pso_sim.expire_all_tokens()
        payload = {"dsScheduleData": {"Activity": [{"id": "A1"}]}}
        async with http.post(f"{server.proxy_url}{ROUTE}/data", json=payload) as resp:
            assert resp.status == 200
            assert (await resp.json())["dsScheduleData"]["Received"] == payload["dsScheduleData"]
        first, second = pso_sim.api_requests[-2:]
        assert (first.status, second.status) == (401, 200)
        assert first.credential != second.credential and first.body == second.body
        assert pso_sim.count_token_requests("session") == 2

    async def test_session_ttl_renews_ahead(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """With session_ttl the broker logs in again before the configured lifetime ends."""
        pso_sim.session_lifetime = 1.2
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file, session_ttl=1)})
        await server.broker.wait_ready(5)
        status, info = await get_json(http, f"{server.admin_url}/connectors/pso")
        assert info["lifetime_source"] == "session_ttl" and info["expires_in"] <= 1
        await pso_sim.wait_for_token_requests(2, grant="session")
        status, _ = await get_json(http, f"{server.proxy_url}{ROUTE}/data")
        assert status == 200
        assert [r.status for r in pso_sim.api_requests] == [200]  # never a 401 first


class TestWrongCredentials:
    async def test_wrong_account_id(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """Wrong account id: auth_failed, then connector_unavailable; logins spaced out; messages name account_id."""
        pso_sim.token_delay = 0.15  # the first request arrives while the first login is in flight
        conn = pso_connector(
            pso_sim, ca_file, account_id="WRONG", login_backoff={"initial": 0.1, "max": 2}
        )
        server = await make_broker({"pso": conn})
        answers = []
        requests = 0

        async def hammer() -> None:
            nonlocal requests
            while True:
                async with http.get(f"{server.proxy_url}{ROUTE}/data") as resp:
                    body = await resp.json()
                    answers.append(
                        (resp.status, resp.headers["X-Broker-Error"], body["error"]["message"])
                    )
                requests += 1

        task = asyncio.create_task(hammer())
        try:
            await pso_sim.wait_for_token_requests(3, grant="session")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert answers[0][:2] == (502, "auth_failed")
        assert {a[:2] for a in answers[1:]} <= {
            (503, "connector_unavailable"),
            (502, "auth_failed"),
        }
        assert any(a[:2] == (503, "connector_unavailable") for a in answers)
        assert all("account_id" in a[2] and pso_sim.password not in a[2] for a in answers)
        logins = pso_sim.token_requests
        assert all(r.status == 400 for r in logins) and len(logins) == 3
        assert requests > 3 * len(logins)
        # The pause doubles: 0.1 s, then 0.2 s (the sim's 0.15 s delay is inside each gap).
        gaps = [b.time - a.time for a, b in itertools.pairwise(logins)]
        assert gaps[0] >= 0.1 + 0.15 - 0.02 and gaps[1] >= 0.2 + 0.15 - 0.02
        assert not pso_sim.api_requests  # nothing was sent without a session
        async with http.get(f"{server.admin_url}/readyz") as resp:
            assert resp.status == 503

    async def test_wrong_password_is_not_retried_like_a_transient_error(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """400 AUTHENTICATION_FAILED is terminal (credentials_rejected), a 503 is transient."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file, password="nope-nope")})
        async with http.get(f"{server.proxy_url}{ROUTE}/data") as resp:
            assert resp.headers["X-Broker-Error"] in ("auth_failed", "connector_unavailable")
        _, info = await get_json(http, f"{server.admin_url}/connectors/pso")
        assert info["last_error_kind"] == "credentials_rejected"
        error = info["last_error"]
        assert "AUTHENTICATION_FAILED" in error["message"]  # type: ignore[index]
        assert error["cause"] == "invalid_credentials"  # type: ignore[index]

    async def test_gateway_5xx_is_transient(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """A 503 from the session endpoint is a transient failure: auth_failed, then a later login works."""
        pso_sim.queue_token_response(503, body={"Message": "Service Unavailable"})
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        await pso_sim.wait_for_token_requests(2, timeout=5)
        await server.broker.wait_ready(5)
        _, info = await get_json(http, f"{server.admin_url}/connectors/pso")
        assert info["token_state"] == "valid"
        assert [r.status for r in pso_sim.token_requests] == [503, 200]
