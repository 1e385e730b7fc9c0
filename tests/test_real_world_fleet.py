"""Fleets on a real redis-server against identity providers as they really behave: shared login
spacing under brute-force detection, and Keycloak's "Revoke Refresh Token"."""

from __future__ import annotations

import asyncio
import itertools
import ssl

import aiohttp

from broker.sandbox import IfsApps10Sim

from .conftest import SimStarter, ifs_connector, metric
from .test_redis import (  # noqa: F401  (fixtures)
    BrokerFactory,
    Traffic,
    fleet_store,
    make_broker,
    redis_server,
    redis_url,
    start_fleet,
)


class TestFleetLoginSpacing:
    async def test_three_replicas_share_the_spacing(
        self,
        start_sim: SimStarter[IfsApps10Sim],
        ca_file: str,
        redis_url: str,  # noqa: F811
        make_broker: BrokerFactory,  # noqa: F811
        http: aiohttp.ClientSession,
    ) -> None:
        """Three replicas with a wrong password under traffic: one failed login per interval
        for the whole fleet, suspended after max_failures, the account never locked."""
        sim = await start_sim(IfsApps10Sim(brute_force=True))
        sim.failure_factor = 4  # a fourth failure would lock the user
        backoff = {"initial": 1.0, "max": 1.0, "max_failures": 3}
        connector = ifs_connector(sim, ca_file, password="wrong", login_backoff=backoff)
        fleet = await start_fleet(make_broker, 3, connector, fleet_store(redis_url))
        traffic = Traffic(http, [s.proxy_url for s in fleet])
        try:
            await sim.wait_for_token_requests(3, timeout=15)
            async with asyncio.timeout(10):
                while not all(
                    s.broker.connectors["ifs"].tokens.status()["login"]["suspended"] for s in fleet
                ):
                    await traffic.wait_for(3)
            await traffic.wait_for(30)  # the fleet stays quiet while suspended
        finally:
            statuses = await traffic.stop()
        failed = sim.token_requests
        assert [r.status for r in failed] == [401, 401, 401]
        gaps = [b.time - a.time for a, b in itertools.pairwise(failed)]
        assert all(gap >= 1.0 - 0.05 for gap in gaps), gaps
        assert sim.locked_refusals == 0 and not sim.locked()
        assert set(statuses) <= {502, 503}
        total = sum(
            metric(
                s, "erp_broker_login_failures_total", connector="ifs", cause="invalid_credentials"
            )
            for s in fleet
        )
        assert total == 3


class TestRevokeRefreshToken:
    async def test_rotations_across_two_replicas_never_reuse(
        self,
        server_ssl: ssl.SSLContext,
        ca_file: str,
        redis_url: str,  # noqa: F811
        make_broker: BrokerFactory,  # noqa: F811
        http: aiohttp.ClientSession,
    ) -> None:
        """With Revoke Refresh Token on, three rotations across two replicas under traffic
        present no used refresh token; when the session ends anyway, one login and the other
        replica adopts the new grant."""
        sim = IfsApps10Sim(revoke_refresh_token=True, token_lifetime=2)
        await sim.start(ssl_context=server_ssl)
        try:
            fleet = await start_fleet(
                make_broker, 2, ifs_connector(sim, ca_file), fleet_store(redis_url)
            )
            traffic = Traffic(http, [s.proxy_url for s in fleet])
            try:
                await sim.wait_for_token_requests(4, timeout=10)  # a login, three rotations
                assert sim.refresh_reuse_events == 0
                # Longer tokens from the next rotation on, so that no refresh is in flight when
                # the session ends (a token issued just before would die unseen: a race no
                # client can avoid).
                sim.token_lifetime = 60
                managers = [s.broker.connectors["ifs"].tokens for s in fleet]
                async with asyncio.timeout(10):
                    while not all(
                        m.current is not None
                        and m.current.expires_at is not None
                        and m.current.expires_at - m.current.obtained_at > 30
                        for m in managers
                    ):
                        await traffic.wait_for(2)
            finally:
                statuses = await traffic.stop()
            # The session ends between requests (an admin logged the user out): every token
            # dies. (A request in flight at that moment could be replayed with a token that
            # died too and get the ERP's 401: no client can avoid that race.)
            sim.revoke_refresh_tokens()
            sim.expire_all_tokens()
            traffic = Traffic(http, [s.proxy_url for s in fleet])
            try:
                await sim.wait_for_token_requests(2, grant="password", timeout=10)
                await traffic.wait_for(20)
            finally:
                statuses += await traffic.stop()
        finally:
            await sim.stop()
        assert sim.refresh_reuse_events == 0
        assert sim.count_token_requests("password") == 2
        assert set(statuses) == {200}  # a request that met the ended session was replayed
