"""Identity providers and ERPs as they really behave, through real brokers (issue 14).

Dead PSO sessions in every style, MI_MODIFIED_ERROR, Keycloak's brute-force detection against
the login governor, precise failure causes, and the ifs_apps10 grant variants.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim
from broker.sandbox.ifs_pso import PSO_BASE

from .conftest import (
    BrokerFactory,
    SimStarter,
    ifs_connector,
    infor_connector,
    metric,
    pso_connector,
)
from .procs import BrokerProcess
from .test_infor import broker_config

PSO_ROUTE = "/pso" + PSO_BASE
IFS_API = "/ifs/main/ifsapplications/projection/v1"


def base_config(tmp_path: Path, connectors: dict[str, Any], **top: Any) -> dict[str, Any]:
    return broker_config(connectors, tmp_path) | top


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


class TestPsoDeadSession:
    async def test_400_style_recovers_with_one_login_and_one_replay(
        self, tmp_path: Path, start_sim: SimStarter[PsoSim], ca_file: str
    ) -> None:
        """A broker process: PSO kills the session and answers 400 AUTHENTICATION_FAILED on a
        data call; the POST succeeds after exactly one new login and one replay."""
        sim = await start_sim(PsoSim(dead_session_style="400"))
        proc = BrokerProcess(base_config(tmp_path, {"pso": pso_connector(sim, ca_file)}), tmp_path)
        await proc.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{proc.proxy_url}{PSO_ROUTE}/data") as resp:
                    assert resp.status == 200
                sim.expire_all_tokens()
                payload = {"dsScheduleData": {"Activity": [{"id": "A1"}]}}
                async with http.post(f"{proc.proxy_url}{PSO_ROUTE}/data", json=payload) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["dsScheduleData"]["Received"] == payload[
                        "dsScheduleData"
                    ]
            assert sim.count_token_requests("session") == 2
            assert [r.status for r in sim.api_requests] == [200, 400, 200]
            await proc.wait_for_event("token_rejected_by_erp")
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()

    @pytest.mark.parametrize("style", ["200", "401"])
    async def test_other_styles(
        self,
        style: str,
        start_sim: SimStarter[PsoSim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """The older 200-with-Code-401 style and a plain 401 recover the same way."""
        sim = await start_sim(PsoSim(dead_session_style=style))
        server = await make_broker({"pso": pso_connector(sim, ca_file)})
        status, _ = await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        assert status == 200
        sim.expire_all_tokens()
        status, body = await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        assert status == 200 and "Resources" in body["dsScheduleData"]
        assert sim.count_token_requests("session") == 2
        assert metric(server, "erp_broker_retries_total", connector="pso", reason="auth") == 1

    async def test_a_400_that_is_not_a_dead_session_goes_back(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """A 400 about the input (not a dead session) reaches the app at once: no new login."""
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        async with http.post(f"{server.proxy_url}{PSO_ROUTE}/data", data=b"{not json") as resp:
            assert resp.status == 400 and (await resp.json())["Message"] == "INVALID_INPUT"
        assert pso_sim.count_token_requests("session") == 1

    async def test_matchers_can_be_switched_off(
        self,
        start_sim: SimStarter[PsoSim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """auth_failure: [] drops the defaults: the 400 goes back to the app as it came."""
        sim = await start_sim(PsoSim(dead_session_style="400"))
        server = await make_broker({"pso": pso_connector(sim, ca_file, auth_failure=[])})
        await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        sim.expire_all_tokens()
        status, body = await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        assert (status, body) == (400, {"Message": "AUTHENTICATION_FAILED"})

    async def test_idle_timeout(
        self,
        start_sim: SimStarter[PsoSim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A session the Gateway dropped for idleness is replaced on the next call."""
        sim = await start_sim(PsoSim(dead_session_style="400", session_idle_timeout=1200))
        server = await make_broker({"pso": pso_connector(sim, ca_file)})
        await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        sim.advance(1201)
        status, _ = await get_json(http, f"{server.proxy_url}{PSO_ROUTE}/resource")
        assert status == 200 and sim.count_token_requests("session") == 2


class TestMiModifiedError:
    async def test_post_retried_once_with_two_erp_attempts(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A POST hit by one MI_MODIFIED_ERROR succeeds with exactly two ERP attempts."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        ifs_sim.mi_modified_errors = 1
        url = f"{server.proxy_url}{IFS_API}/CustomerHandling.svc/CustomerInfoSet"
        async with http.post(url, json={"CustomerId": "C-MI", "Name": "Metadata AB"}) as resp:
            assert resp.status == 201
        assert [r.status for r in ifs_sim.api_requests] == [500, 201]
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason="transient") == 1

    async def test_only_once_and_only_with_the_matcher(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Two MI_MODIFIED_ERRORs in a row: the second goes back; retry_on: [] retries none;
        a plain 500 is never retried."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        url = f"{server.proxy_url}{IFS_API}/AllProjections.svc/Projections"
        ifs_sim.mi_modified_errors = 2
        status, body = await get_json(http, url)
        assert (status, body["error"]["code"]) == (500, "MI_MODIFIED_ERROR")
        assert len(ifs_sim.api_requests) == 2
        ifs_sim.queue_api_response(500, body={"error": {"code": "ODP_ERROR", "message": "x"}})
        assert (await get_json(http, url))[0] == 500 and len(ifs_sim.api_requests) == 3
        off = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, retry_on=[], route="/off/")}
        )
        ifs_sim.mi_modified_errors = 1
        status, _ = await get_json(
            http,
            f"{off.proxy_url}/off/main/ifsapplications/projection/v1/AllProjections.svc/Projections",
        )
        assert status == 500 and len(ifs_sim.api_requests) == 4


class TestLockoutSafeLogins:
    async def test_steady_traffic_never_locks_the_account(
        self, tmp_path: Path, start_sim: SimStarter[IfsApps10Sim], ca_file: str
    ) -> None:
        """A broker process with a wrong password against Keycloak's brute-force detection:
        failed logins spaced as configured (never two within `initial`), paused after
        max_failures, the account never locked; the corrected secret file resumes with one
        login."""
        sim = await start_sim(IfsApps10Sim(brute_force=True))
        sim.failure_factor = 5  # a fifth failure would lock the user: the broker stops at 4
        secret = tmp_path / "password"
        secret.write_text("wrong-password\n")
        backoff = {"initial": 1.2, "max": 2.0, "max_failures": 4}
        connector = ifs_connector(
            sim, ca_file, password=f"${{file:{secret}}}", login_backoff=backoff
        )
        config = base_config(tmp_path, {"ifs": connector}, credentials_reload_interval=0.2)
        proc = BrokerProcess(config, tmp_path)
        await proc.start()
        try:
            async with aiohttp.ClientSession() as http:
                answers: list[tuple[int, str]] = []
                stop = asyncio.Event()

                async def traffic() -> None:
                    for _ in range(2000):  # bounded: ~10 s of steady requests
                        if stop.is_set():
                            return
                        async with http.get(f"{proc.proxy_url}/ifs/_test/echo/x") as resp:
                            body = await resp.json()
                            answers.append((resp.status, body["error"]["message"]))
                        await asyncio.sleep(0.01)

                task = asyncio.create_task(traffic())
                try:
                    await proc.wait_for_event("credentials_rejected", timeout=10)
                    await proc.wait_for_event_count("credentials_rejected", 4, timeout=20)
                    async with asyncio.timeout(10):
                        while not (await get_json(http, f"{proc.admin_url}/connectors/ifs"))[1][
                            "login"
                        ]["suspended"]:
                            await asyncio.sleep(0.05)
                    seen = len(answers)
                    while len(answers) < seen + 50 and not task.done():
                        await asyncio.sleep(0.05)  # more traffic while paused: no login
                finally:
                    stop.set()
                    await task
                failed = list(sim.token_requests)
                assert [r.status for r in failed] == [401] * 4
                gaps = [b.time - a.time for a, b in itertools.pairwise(failed)]
                assert all(gap >= 1.2 - 0.05 for gap in gaps), gaps
                assert sim.locked_refusals == 0 and not sim.locked()
                _, info = await get_json(http, f"{proc.admin_url}/connectors/ifs")
                assert info["token_state"] == "paused" and info["login"]["suspended"] is True
                assert info["last_error"]["cause"] == "invalid_credentials"
                assert sim.password not in str(info)
                assert "may be locked by the identity provider" in answers[-1][1]
                async with http.get(f"{proc.admin_url}/metrics") as resp:
                    scraped = await resp.text()
                assert (
                    'erp_broker_login_failures_total{cause="invalid_credentials",connector="ifs"} 4.0'
                    in scraped
                )
                assert 'erp_broker_login_suspended{connector="ifs"} 1.0' in scraped
                # The operator fixes the secret: one login, and traffic flows.
                secret.write_text(sim.password + "\n")
                await sim.wait_for_token_requests(5, timeout=10)
                async with http.get(f"{proc.proxy_url}/ifs/_test/echo/x") as resp:
                    assert resp.status == 200
                assert [r.status for r in sim.token_requests] == [401] * 4 + [200]
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()

    async def test_operator_refresh_resumes_a_paused_connector(
        self,
        start_sim: SimStarter[IfsApps10Sim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Paused after max_failures; once the account is fixed at the identity provider,
        POST /connectors/<name>/refresh logs in (the minimum spacing still holds)."""
        sim = await start_sim(IfsApps10Sim(user_set_up=False))
        backoff = {"initial": 0.2, "max": 0.2, "max_failures": 2}
        server = await make_broker({"ifs": ifs_connector(sim, ca_file, login_backoff=backoff)})
        await sim.wait_for_token_requests(2, timeout=5)
        tokens = server.broker.connectors["ifs"].tokens
        async with asyncio.timeout(5):
            while not tokens.status()["login"]["suspended"]:
                await asyncio.sleep(0.02)
        assert tokens.status()["last_error"]["cause"] == "account_not_set_up"
        sim.user_set_up = True
        async with asyncio.timeout(5):
            while True:
                async with http.post(f"{server.admin_url}/connectors/ifs/refresh") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
        assert [r.status for r in sim.token_requests][-1] == 200
        assert tokens.usable()


class TestCauses:
    @pytest.mark.parametrize(
        ("sim_switches", "overrides", "cause", "names"),
        [
            ({}, {"password": "wrong"}, "invalid_credentials", "username and password"),
            (
                {"keycloak_version": "26.6"},
                {"password": "wrong"},
                "invalid_credentials",
                "brute-force",
            ),
            ({"user_enabled": False}, {}, "account_disabled", "enable it"),
            ({"user_set_up": False}, {}, "account_not_set_up", "password policy"),
            ({"direct_grants": False}, {}, "client_not_allowed", "Direct access grants"),
            ({}, {"client_secret": "wrong"}, "invalid_client", "client_secret"),
            ({"client_enabled": False}, {}, "invalid_client", "enabled"),
            (
                {"service_accounts": False},
                {"auth": "client_credentials"},
                "client_not_allowed",
                "Service accounts",
            ),
        ],
    )
    async def test_cause_in_connectors_metric_and_test_connection(
        self,
        sim_switches: dict[str, Any],
        overrides: dict[str, Any],
        cause: str,
        names: str,
        start_sim: SimStarter[IfsApps10Sim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        tmp_path: Path,
    ) -> None:
        """Each Keycloak failure has its cause in /connectors, the metric, the auth_failed
        message and test-connection; the message names what to check, never a secret."""
        sim = await start_sim(IfsApps10Sim())
        for name, value in sim_switches.items():
            setattr(sim, name, value)
        connector = ifs_connector(sim, ca_file, **overrides)
        server = await make_broker({"ifs": connector})
        await sim.wait_for_token_requests(1, timeout=5)
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            message = (await resp.json())["error"]["message"]
        assert names in message and sim.password not in message
        _, info = await get_json(http, f"{server.admin_url}/connectors/ifs")
        assert info["last_error"]["cause"] == cause and names in info["last_error"]["message"]
        assert metric(server, "erp_broker_login_failures_total", connector="ifs", cause=cause) == 1
        async with http.post(f"{server.admin_url}/connectors/ifs/test") as resp:
            result = await resp.json()
        assert result["ok"] is False and result["cause"] == cause

    async def test_refresh_rejected_falls_back_to_one_login(
        self, ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory
    ) -> None:
        """A dead refresh token (session ended) is refresh_rejected: one fresh login, not a
        credential rejection (no pause)."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        ifs_sim.revoke_refresh_tokens()
        tokens = server.broker.connectors["ifs"].tokens
        before = tokens.current
        async with asyncio.timeout(5):
            # It may join the start-up login still in flight: ask until a new token is made.
            while await tokens.refresh_now() is before:
                pass
        assert [r.grant for r in ifs_sim.token_requests] == [
            "password",
            "refresh_token",
            "password",
        ]
        assert (
            metric(
                server, "erp_broker_login_failures_total", connector="ifs", cause="refresh_rejected"
            )
            == 1
        )
        assert tokens.status()["login"]["failures_in_a_row"] == 0 and tokens.usable()


class TestIfsGrants:
    async def test_client_credentials(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """auth: client_credentials needs only the client; no refresh token; a new token
        ahead of expiry."""
        connector = ifs_connector(ifs_sim, ca_file, auth="client_credentials")
        del connector["username"], connector["password"]
        ifs_sim.token_lifetime = 3
        server = await make_broker({"ifs": connector})
        status, _ = await get_json(
            http, f"{server.proxy_url}{IFS_API}/AllProjections.svc/Projections"
        )
        assert status == 200
        await ifs_sim.wait_for_token_requests(2, timeout=10)
        assert {r.grant for r in ifs_sim.token_requests} == {"client_credentials"}
        assert "username" not in ifs_sim.token_requests[0].form

    async def test_basic(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """auth: basic sends HTTP Basic on every request; no token endpoint is called."""
        connector = ifs_connector(ifs_sim, ca_file, auth="basic")
        for key in ("client_id", "client_secret", "realm"):
            del connector[key]
        server = await make_broker({"ifs": connector})
        status, body = await get_json(http, f"{server.proxy_url}/ifs/int/orders")
        assert (status, body["cluster"]) == (200, "integration")
        assert ifs_sim.api_requests[-1].headers["Authorization"].startswith("Basic ")
        assert ifs_sim.token_requests == []

    async def test_native_provider_token_params_and_id_token(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """token_params (a ${…} reference) reach the native provider; inject: id_token sends
        the ID token as the Bearer; expires_in as a string is understood."""
        ifs_sim.native_resource = "5f0c-client-guid"
        ifs_sim.id_token_only = ifs_sim.expires_in_string = True
        monkeypatch.setenv("IFS_RESOURCE", "5f0c-client-guid")
        connector = ifs_connector(
            ifs_sim,
            ca_file,
            token_url="/openid-connect-provider/idp/token",
            token_params={"resource": "${IFS_RESOURCE}", "response_type": "id_token token"},
            inject="id_token",
        )
        server = await make_broker({"ifs": connector})
        status, _ = await get_json(
            http, f"{server.proxy_url}{IFS_API}/AllProjections.svc/Projections"
        )
        assert status == 200
        form = ifs_sim.token_requests[0].form
        assert form["resource"] == "5f0c-client-guid" and form["response_type"] == "id_token token"
        info = server.broker.connectors["ifs"].tokens.status()
        assert info["lifetime_source"] == "expires_in" and 170 < info["expires_in"] <= 180


class WallClock:
    """The broker's wall clock, moved ahead by the test together with the simulator's."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class TestInforGrants:
    async def test_idle_grant_kept_alive_across_simulated_days(
        self,
        start_sim: SimStarter[InforIonSim],
        ca_file: str,
        store_path: str,
        http: aiohttp.ClientSession,
    ) -> None:
        """No traffic for 35 simulated days (Infor kills a grant idle for 30): the broker
        refreshes the idle grant before it dies, so no second password login is ever needed;
        erp_broker_grant_idle_expiry_timestamp_seconds says when it would die."""
        sim = await start_sim(InforIonSim(token_lifetime=45 * 86400))
        clock = WallClock()
        config = parse_config(
            base_config(Path(store_path).parent, {"infor": infor_connector(sim, ca_file)})
            | {"store": {"sqlite": store_path}}
        )
        server = BrokerServer(Broker(config, clock=clock))
        await server.start()
        try:
            tokens = server.broker.connectors["infor"].tokens
            await server.broker.wait_ready(5)
            for day in range(1, 36):
                sim.advance(86400)
                clock.offset += 86400
                tokens.wake()
                if day == 25:  # grant_keepalive_days after the login
                    async with asyncio.timeout(5):
                        while tokens.current is None or tokens.current.grant != "refresh_token":
                            await asyncio.sleep(0.01)
            assert sim.idle_deaths == 0
            before = tokens.current
            assert before is not None
            expiry = metric(
                server, "erp_broker_grant_idle_expiry_timestamp_seconds", connector="infor"
            )
            assert expiry == pytest.approx(before.obtained_at + 30 * 86400)
            await tokens.refresh_now()  # the grant is alive on day 35
            assert [(r.grant, r.status) for r in sim.token_requests] == [
                ("password", 200),
                ("refresh_token", 200),
                ("refresh_token", 200),
            ]
            status, _ = await get_json(
                http, f"{server.proxy_url}/infor/ifsservice/usermgt/v2/users/me"
            )
            assert status == 200
        finally:
            await server.stop(revoke=False)

    async def test_429_without_retry_after_falls_back_to_backoff(
        self,
        start_sim: SimStarter[InforIonSim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Spike arrest's 429 without Retry-After: the broker backs off (jittered, within the
        budget) and the request then succeeds."""
        sim = await start_sim(InforIonSim(quota=(1, 0.2), quota_retry_after=False))
        retry = {"base_delay": 0.5, "max_retries": 6}
        server = await make_broker({"infor": infor_connector(sim, ca_file, retry=retry)})
        url = f"{server.proxy_url}/infor/ifsservice/usermgt/v2/users/me"
        assert (await get_json(http, url))[0] == 200
        assert (await get_json(http, url))[0] == 200
        statuses = [r.status for r in sim.api_requests]
        assert 429 in statuses and statuses[-1] == 200
        assert (
            metric(server, "erp_broker_retries_total", connector="infor", reason="rate_limited")
            >= 1
        )

    async def test_rate_smoothing_delays_instead_of_refusing(
        self,
        start_sim: SimStarter[InforIonSim],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Spike arrest that smooths (delays) instead of refusing: every request succeeds, no
        retry is needed."""
        sim = await start_sim(InforIonSim(quota=(1, 0.2), smoothing=True))
        server = await make_broker({"infor": infor_connector(sim, ca_file)})
        url = f"{server.proxy_url}/infor/ifsservice/usermgt/v2/users/me"
        results = await asyncio.gather(*(get_json(http, url) for _ in range(4)))
        assert [status for status, _ in results] == [200] * 4
        assert (
            metric(server, "erp_broker_retries_total", connector="infor", reason="rate_limited")
            == 0
        )
