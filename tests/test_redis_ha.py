"""Fleets on highly available Redis: Sentinel (a primary, a replica, three sentinels) and a
three-node Cluster, all real processes on loopback."""

# The fixtures imported from test_redis are parameters of the tests below (that is how pytest
# uses them), which flake8's F811 reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster

from broker.config import parse_config
from broker.errors import ConfigError
from broker.sandbox import IfsApps10Sim

from . import test_redis as single
from .conftest import BrokerFactory, ifs_connector, metric
from .procs import BrokerProcess
from .redis_server import ClusterGroup, SentinelGroup
from .test_redis import (  # noqa: F401 (fixtures)
    LogRecorder,
    eventually,
    fleet_store,
    make_broker,
    rotating_sim,
    spread,
    store_of,
)

# -- store.redis URLs ----------------------------------------------------------------------------


CONNECTORS = {
    "ifs": {
        "type": "ifs_apps10",
        "base_url": "https://ifs.example.com",
        "realm": "ifs",
        "client_id": "c",
        "client_secret": "s",
        "username": "u",
        "password": "p",
    }
}


def _store_problem(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"redis": url}, "connectors": CONNECTORS})
    [problem] = [p for p in caught.value.problems if "store" in p]
    return problem


class TestUrls:
    @pytest.mark.parametrize(
        "url",
        [
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3/mymaster/0",
            "rediss+sentinel://sentinel.redis.svc/mymaster?ssl_ca_certs=/ca.pem",
            "redis+cluster://node-0:6379,node-1:6379",
            "rediss+cluster://:pw@node-0:6379/?ssl_ca_certs=/ca.pem",
        ],
    )
    def test_sentinel_and_cluster_urls_are_accepted(self, url: str) -> None:
        """Both forms, with TLS and a password, pass validation; the password is masked when shown."""
        config = parse_config({"store": {"redis": url}, "connectors": CONNECTORS})
        assert ":pw@" not in str(config.redacted()["store"]["redis"])

    @pytest.mark.parametrize(
        ("url", "complaint"),
        [
            ("redis+sentinel://:hunter2secret@h1:26379,h2:26379", "names the primary's service"),
            ("redis+sentinel://:hunter2secret@h1:notaport/mymaster/0", "invalid host:port"),
            ("redis+sentinel://:hunter2secret@h1/mymaster/zero", "database must be a number"),
            ("redis+cluster://:hunter2secret@h1:6379/3", "Cluster has only db 0"),
            ("redis+cluster://:hunter2secret@/", "names no host"),
            ("redis+cluster://:hunter2secret@h1,,h2", "empty host"),
            ("redis+cluster://:hunter2secret@h1?db=2", "unknown option 'db'"),
            ("memcached://:hunter2secret@h1", "redis+sentinel://"),
            ("redis+cluster://:hunter2secret@h1?ssl_ca_certs=/ca.pem", "use rediss+cluster://"),
        ],
    )
    def test_bad_urls_name_store_redis_and_what_is_wrong(self, url: str, complaint: str) -> None:
        """One line naming store.redis and the problem, never the password."""
        problem = _store_problem(url)
        assert "store.redis: " in problem and complaint in problem
        assert "hunter2secret" not in problem


# -- Sentinel ------------------------------------------------------------------------------------


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path).start()
    yield group
    group.kill()


async def _post(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url) as resp:
        await resp.read()
        return resp.status


async def _store_up(http: aiohttp.ClientSession, admin_url: str) -> bool:
    async with http.get(f"{admin_url}/readyz") as resp:
        return bool((await resp.json())["store"]["up"])


async def _new_token(tokens: Any) -> Any:
    """As POST /connectors/ifs/refresh does, until a token request is made (a refresh joins
    one in flight: the start-up one may still be releasing the lock)."""
    before = tokens.current
    while (token := await tokens.refresh_now()) is before:
        await asyncio.sleep(0)
    return token


class TestSentinel:
    async def test_failover_right_after_a_rotation_loses_no_token(
        self,
        rotating_sim: IfsApps10Sim,
        ca_file: str,
        sentinels: SentinelGroup,
        tmp_path: Path,
        http: aiohttp.ClientSession,
    ) -> None:
        """Two `erp-broker run` processes on Sentinel: a cold-start burst logs in once; a refresh rotates the
        refresh token and the primary is killed right after; the sentinels promote the replica, every replica
        serves again within seconds, and the next refresh (by another replica) presents the newest refresh token."""
        rotating_sim.token_delay = 0.3
        config = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": fleet_store(sentinels.url, timeout=1.0),
            "grace_period": 2,
            "connectors": {"ifs": ifs_connector(rotating_sim, ca_file)},
        }
        procs = []
        for i in range(2):
            (tmp_path / f"replica{i}").mkdir()
            procs.append(BrokerProcess(config, tmp_path / f"replica{i}"))
        try:
            # Generous: a Python process starts slowly on a loaded machine.
            await asyncio.gather(*(p.start(timeout=45) for p in procs))
            bases = [p.proxy_url for p in procs]
            assert await spread(http, bases, 60) == [200] * 60
            assert rotating_sim.count_token_requests() == 1
            rotating_sim.token_delay = 0.0

            assert await _post(http, f"{procs[0].admin_url}/connectors/ifs/refresh") == 200
            sentinels.primary.kill()  # SIGKILL, right after the rotated token was saved
            killed = time.monotonic()
            # With no primary, every replica serves with the token it holds.
            assert await spread(http, bases, 30) == [200] * 30
            await asyncio.to_thread(sentinels.wait_promoted, 20)
            for admin in [p.admin_url for p in procs]:
                await eventually(
                    lambda admin=admin: _store_up(http, admin),
                    15,
                    "the replica follows the new primary",
                )
            recovered = time.monotonic() - killed
            assert await spread(http, bases, 30) == [200] * 30

            assert await _post(http, f"{procs[1].admin_url}/connectors/ifs/refresh") == 200
            assert await spread(http, bases, 30) == [200] * 30
            for p in procs:
                p.signal(signal.SIGTERM)
            assert [await p.wait() for p in procs] == [0, 0]
        finally:
            for p in procs:
                await p.kill()
        refreshes = [r for r in rotating_sim.token_requests if r.grant == "refresh_token"]
        assert [r.status for r in refreshes] == [200, 200]
        assert len({r.form["refresh_token"] for r in refreshes}) == 2  # no reuse
        assert rotating_sim.count_token_requests("password") == 1
        assert not [r for r in rotating_sim.api_requests if r.status != 200]
        assert recovered < 20

    async def test_a_saved_token_waits_for_a_replica(
        self,
        rotating_sim: IfsApps10Sim,
        ca_file: str,
        sentinels: SentinelGroup,
        make_broker: BrokerFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The refresh is not done before the replica acknowledged the new token (WAIT 1); a replica that does
        not answer in time delays it at most half the store timeout, and is logged and counted."""
        logs = LogRecorder()
        monkeypatch.setattr(single.redis_store, "log", logs)
        server = await make_broker(
            {"ifs": ifs_connector(rotating_sim, ca_file)},
            store=fleet_store(sentinels.url, timeout=2.0),
        )
        await server.broker.wait_ready(5)
        tokens = server.broker.connectors["ifs"].tokens
        primary = redis.asyncio.Redis(port=sentinels.primary.port)
        replica = redis.asyncio.Redis(port=sentinels.replica.port)
        try:
            sentinels.replica.pause()
            try:
                refresh = asyncio.create_task(_new_token(tokens))

                async def waiting() -> bool:
                    return int((await primary.info("clients"))["blocked_clients"]) >= 1

                await eventually(waiting, 5, "the save waits for the replica (WAIT)")
                assert not refresh.done()
            finally:
                sentinels.replica.resume()
            token = await asyncio.wait_for(refresh, 5)
            stored = [k async for k in replica.scan_iter(match="erp-broker:{ifs}:token:*")]
            assert len(stored) == 1
            assert (
                metric(server, "erp_broker_store_replication_unacknowledged_total", connector="ifs")
                == 0
            )

            sentinels.replica.pause()
            try:
                started = time.monotonic()
                newer = await asyncio.wait_for(_new_token(tokens), 5)
                waited = time.monotonic() - started
            finally:
                sentinels.replica.resume()
        finally:
            await primary.aclose()
            await replica.aclose()
        # Used anyway: a lost token beats an outage.
        assert newer is not token and tokens.current is newer
        assert 0.9 <= waited < 2.5
        assert (
            metric(server, "erp_broker_store_replication_unacknowledged_total", connector="ifs")
            == 1
        )
        [event] = logs.events("store_replication_unacknowledged")
        assert event["connector"] == "ifs"

    async def test_password_from_a_file_for_nodes_and_sentinels(
        self, ifs_sim: IfsApps10Sim, ca_file: str, tmp_path: Path, make_broker: BrokerFactory
    ) -> None:
        """Sentinels and data nodes that want a password: store.redis_password from ${file:} opens both; a
        second replica adopts the token; the password is shown nowhere."""
        password = "sentinel-pass-0123456789"
        group = SentinelGroup(tmp_path, password=password).start()
        try:
            secret = tmp_path / "redis-password"
            secret.write_text(f"{password}\n")
            store = fleet_store(group.url, redis_password=f"${{file:{secret}}}")
            first = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)}, store=store)
            await first.broker.wait_ready(5)
            second = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)}, store=store)
            await second.broker.connectors["ifs"].tokens.wait_usable(5)
            assert ifs_sim.count_token_requests() == 1
            status = first.broker.store_status()
            assert status["up"] is True and status["mode"] == "sentinel"
            assert password not in repr(status) and password not in str(
                first.broker.config.redacted()
            )
        finally:
            group.kill()


# -- Cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterGroup]:
    group = ClusterGroup(tmp_path_factory.mktemp("cluster")).start()
    yield group
    group.kill()


class OnCluster:
    """The single-server fleet tests, run unchanged on a three-node Cluster."""

    @pytest.fixture
    def redis_url(self, cluster: ClusterGroup) -> str:
        cluster.flush()
        return cluster.url

    @pytest.fixture
    async def inspect(self, redis_url: str, cluster: ClusterGroup) -> AsyncIterator[Any]:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        yield client
        await client.aclose()


class TestClusterColdStart(OnCluster, single.TestColdStart):
    """One login per cold start across replicas."""

    # Processes on Redis are proven on a single server and on Sentinel; here they would only
    # add start-up time.
    test_three_processes_log_in_once = None  # type: ignore[assignment]


class TestClusterSharedRateLimit(OnCluster, single.TestSharedRateLimit):
    """A 429 window honoured by every replica; the shared rate budget held."""


class TestClusterKeys(OnCluster):
    async def test_every_key_of_a_connector_in_one_slot(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        cluster: ClusterGroup,
        inspect: Any,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Token, lock (taken and released), window and budget of one connector share a hash slot."""
        connector = ifs_connector(
            ifs_sim, ca_file, rate_limit={"requests": 100, "per_seconds": 1.0}
        )
        server = await make_broker({"ifs": connector}, store=fleet_store(redis_url))
        ifs_sim.queue_api_response(429, headers={"Retry-After": "1"}, body="slow down")
        assert await spread(http, [server.proxy_url], 2) == [200] * 2
        names = [k async for k in inspect.scan_iter(match="erp-broker:*")]
        kinds = {n.decode().split(":")[2] for n in names}
        assert {"token", "budget"} <= kinds
        assert len({inspect.keyslot(n) for n in names}) == 1
        assert store_of(server).status()["mode"] == "cluster"
