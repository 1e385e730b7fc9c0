"""A fleet of replicas on one real redis-server: one credential, one lock, one quota."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio
import trustme

from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.errors import EncryptionKeyError, StoreError
from broker.sandbox import IfsApps10Sim
from broker.stores import redis as redis_store
from broker.stores.redis import RedisStore

from .conftest import BrokerFactory, ifs_connector, metric
from .procs import BrokerProcess
from .redis_server import RedisServer, RedisTls

LEASE = 2.0


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module; each test starts from an empty database."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
async def inspect(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """The test's own view of Redis."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop, restart or freeze."""
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
async def rotating_sim(server_ssl: ssl.SSLContext) -> AsyncIterator[IfsApps10Sim]:
    """Keycloak with "Revoke Refresh Token": a refresh token works once."""
    sim = IfsApps10Sim(rotate_refresh=True)
    await sim.start(ssl_context=server_ssl)
    yield sim
    await sim.stop()


@pytest.fixture
async def make_broker() -> AsyncIterator[BrokerFactory]:
    """Replicas in this process, each opening the store its config names (here: Redis)."""
    servers: list[BrokerServer] = []

    async def make(connectors: dict[str, Any], *, store: dict[str, Any]) -> BrokerServer:
        config = parse_config(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "store": store,
                "grace_period": 2,
                "connectors": connectors,
            }
        )
        server = BrokerServer(Broker(config))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def fleet_store(url: str, **extra: Any) -> dict[str, Any]:
    return {"redis": url, "timeout": 1.0, "lock_lease": LEASE, **extra}


async def start_fleet(
    make_broker: BrokerFactory, n: int, connector: dict[str, Any], store: dict[str, Any]
) -> list[BrokerServer]:
    """``n`` replicas, started together as a Deployment's pods would be."""
    return list(
        await asyncio.gather(*(make_broker({"ifs": connector}, store=store) for _ in range(n)))
    )


async def status_of(http: aiohttp.ClientSession, base: str, path: str) -> int:
    async with http.get(f"{base}{path}") as resp:
        await resp.read()
        return resp.status


async def spread(http: aiohttp.ClientSession, bases: list[str], n: int) -> list[int]:
    """``n`` concurrent requests, round robin over the replicas."""
    return list(
        await asyncio.gather(
            *(status_of(http, bases[i % len(bases)], f"/ifs/_test/echo/{i}") for i in range(n))
        )
    )


def store_of(server: BrokerServer) -> RedisStore:
    store = server.broker.store
    assert isinstance(store, RedisStore)
    return store


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll a condition that only Redis can answer (no event reaches the test from there)."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None


async def lock_keys(client: redis.asyncio.Redis) -> list[bytes]:
    return [key async for key in client.scan_iter(match="erp-broker:{*}:lock:*")]


class Traffic:
    """Requests round robin over replicas until stopped; every status is kept."""

    def __init__(self, http: aiohttp.ClientSession, bases: list[str], concurrency: int = 4) -> None:
        self.http, self.bases, self.statuses = http, bases, list[int]()
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(concurrency)]

    async def _run(self, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            self.statuses.append(
                await status_of(self.http, self.bases[n % len(self.bases)], f"/ifs/_test/echo/{n}")
            )
            n += 1
            async with self._progress:
                self._progress.notify_all()

    async def wait_for(self, more: int, timeout: float = 5.0) -> None:
        """Return once ``more`` further requests were answered."""
        target = len(self.statuses) + more
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: len(self.statuses) >= target)

    async def stop(self) -> list[int]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.statuses


class LogRecorder:
    """Stands in for the store module's logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str) -> Callable[..., None]:
        def emit(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return emit

    def __getattr__(self, level: str) -> Callable[..., None]:
        return self._log(level)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.lines if event == name]


# -- single flight -----------------------------------------------------------------------------


class TestColdStart:
    async def test_burst_over_three_replicas_logs_in_once(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Three replicas start together under a burst: one login for the fleet, every request served."""
        ifs_sim.token_delay = 0.3
        fleet = await start_fleet(
            make_broker, 3, ifs_connector(ifs_sim, ca_file), fleet_store(redis_url)
        )
        statuses = await spread(http, [s.proxy_url for s in fleet], 150)
        assert statuses == [200] * 150
        assert ifs_sim.count_token_requests() == 1
        assert (
            sum(
                metric(
                    s,
                    "erp_broker_token_requests_total",
                    connector="ifs",
                    grant="password",
                    outcome="success",
                )
                for s in fleet
            )
            == 1
        )

    async def test_three_processes_log_in_once(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        tmp_path: Path,
        http: aiohttp.ClientSession,
    ) -> None:
        """Three `erp-broker run` processes on one Redis: one login; the others adopt its token."""
        ifs_sim.token_delay = 0.5
        config = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": fleet_store(redis_url),
            "grace_period": 2,
            "connectors": {"ifs": ifs_connector(ifs_sim, ca_file)},
        }
        workdirs = [tmp_path / f"replica{i}" for i in range(3)]
        for workdir in workdirs:
            workdir.mkdir()
        procs = [BrokerProcess(config, workdir) for workdir in workdirs]
        try:
            await asyncio.gather(*(p.start(timeout=45) for p in procs))
            statuses = await spread(http, [p.proxy_url for p in procs], 60)
            assert statuses == [200] * 60
            assert ifs_sim.count_token_requests() == 1
            obtained = [e for p in procs for e in p.events if e.get("event") == "token_obtained"]
            adopted = [
                e
                for p in procs
                for e in p.events
                if e.get("event") in ("token_adopted", "token_loaded")
            ]
            assert len(obtained) == 1 and len(adopted) == 2
            for p in procs:
                p.signal(signal.SIGTERM)
            assert [await p.wait() for p in procs] == [0, 0, 0]
        finally:
            for p in procs:
                await p.kill()


class TestRotation:
    async def test_replicas_taking_turns_never_send_an_old_refresh_token(
        self,
        rotating_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Each replica in turn refreshes: it starts from the fleet's newest refresh token, never its own older one."""
        fleet = await start_fleet(
            make_broker, 3, ifs_connector(rotating_sim, ca_file), fleet_store(redis_url)
        )
        await asyncio.gather(*(s.broker.wait_ready(5) for s in fleet))
        for server in fleet:
            tokens = server.broker.connectors["ifs"].tokens
            before = tokens.current
            async with asyncio.timeout(5):
                # As POST /connectors/ifs/refresh does. It joins a token request in flight: a
                # replica's start-up one may still be releasing the lock, so ask until one is made.
                while await tokens.refresh_now() is before:
                    await asyncio.sleep(0)
            assert await spread(http, [s.proxy_url for s in fleet], 9) == [200] * 9
        refreshes = [r for r in rotating_sim.token_requests if r.grant == "refresh_token"]
        assert [r.status for r in refreshes] == [200, 200, 200]
        assert len({r.form["refresh_token"] for r in refreshes}) == 3
        assert rotating_sim.count_token_requests("password") == 1

    async def test_rotations_at_expiry_under_traffic(
        self,
        server_ssl: ssl.SSLContext,
        ca_file: str,
        redis_url: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """2-second tokens, rotating refresh tokens, three replicas under load: one refresh per expiry, none rejected."""
        sim = IfsApps10Sim(rotate_refresh=True, token_lifetime=2)
        await sim.start(ssl_context=server_ssl)
        try:
            fleet = await start_fleet(
                make_broker, 3, ifs_connector(sim, ca_file), fleet_store(redis_url)
            )
            traffic = Traffic(http, [s.proxy_url for s in fleet])
            try:
                await sim.wait_for_token_requests(4, timeout=8)  # the login and three refreshes
            finally:
                statuses = await traffic.stop()
            assert len(sim.token_requests) == 4
        finally:
            await sim.stop()
        assert len(statuses) > 30 and set(statuses) == {200}
        assert [(r.grant, r.status) for r in sim.token_requests] == [("password", 200)] + [
            ("refresh_token", 200)
        ] * 3
        assert len({r.form["refresh_token"] for r in sim.token_requests[1:]}) == 3
        assert not [r for r in sim.api_requests if r.status != 200]


class TestLease:
    async def test_replica_killed_holding_the_lock_delays_others_at_most_the_lease(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        inspect: redis.asyncio.Redis,
        tmp_path: Path,
        make_broker: BrokerFactory,
    ) -> None:
        """SIGKILL during a slow login: another replica logs in once the lease runs out, not later."""
        ifs_sim.token_delay = 30.0
        connector = ifs_connector(ifs_sim, ca_file)
        config = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": fleet_store(redis_url),
            "connectors": {"ifs": connector},
        }
        victim = await BrokerProcess(config, tmp_path).start()
        try:
            await eventually(
                lambda: _has_lock(inspect), 5, "the first replica takes the refresh lock"
            )
            # Renewed while the login runs: still held after more than a lease.
            await asyncio.sleep(LEASE * 1.2)
            [lock] = await lock_keys(inspect)
            victim.signal(signal.SIGKILL)
            killed = time.monotonic()
            remaining = await inspect.pttl(lock) / 1000
        finally:
            await victim.kill()
        assert 0 < remaining <= LEASE
        ifs_sim.token_delay = 0.0
        survivor = await make_broker({"ifs": connector}, store=fleet_store(redis_url))
        await survivor.broker.connectors["ifs"].tokens.wait_usable(LEASE + 3)
        waited = time.monotonic() - killed
        assert remaining - 0.1 <= waited <= LEASE + 0.5
        assert (
            ifs_sim.count_token_requests() == 2
        )  # the dead replica's (cut off) and the survivor's
        assert [r.status for r in ifs_sim.token_requests] == [499, 200]


async def _has_lock(client: redis.asyncio.Redis) -> bool:
    return bool(await lock_keys(client))


# -- shared windows and budgets ------------------------------------------------------------------


class TestSharedRateLimit:
    async def test_retry_after_seen_by_one_replica_holds_for_all(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        inspect: redis.asyncio.Redis,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A 429 with Retry-After: 2 at one replica: no replica sends the ERP anything for 2 s."""
        fleet = await start_fleet(
            make_broker, 3, ifs_connector(ifs_sim, ca_file), fleet_store(redis_url)
        )
        assert await spread(http, [s.proxy_url for s in fleet], 3) == [200] * 3
        ifs_sim.queue_api_response(429, headers={"Retry-After": "2"}, body="slow down")
        first = asyncio.create_task(status_of(http, fleet[0].proxy_url, "/ifs/_test/echo/limited"))
        await eventually(
            lambda: inspect.exists("erp-broker:{ifs}:window:ifs"), 5, "the window reaches Redis"
        )

        async def pushed_to_all() -> bool:
            return all([await s.broker.coordinator.wait_window("ifs") > 0 for s in fleet])

        await eventually(pushed_to_all, 1, "every replica learns of the window")
        [limited] = [r for r in ifs_sim.api_requests if r.status == 429]
        others = await spread(http, [s.proxy_url for s in fleet[1:]], 10)
        assert others == [200] * 10 and await first == 200
        after = [r for r in ifs_sim.api_requests if r.time > limited.time]
        assert len(after) == 11
        assert min(r.time for r in after) >= limited.time + 1.95
        assert (
            sum(metric(s, "erp_broker_rate_limit_waits_total", connector="ifs") for s in fleet[1:])
            >= 10
        )

    async def test_window_longer_than_a_replicas_budget_is_refused_there(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A replica with retry.max_total 1 (mid-rollout of a new config) learns of a 4 s
        window another replica's 429 opened: its requests get rate_limited at once, without
        sleeping it out or reaching the ERP; the replica that got the 429 waits and succeeds."""
        patient = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, store=fleet_store(redis_url)
        )
        hasty = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, retry={"max_total": 1})},
            store=fleet_store(redis_url),
        )
        await patient.broker.wait_ready(5)
        await hasty.broker.wait_ready(5)
        ifs_sim.queue_api_response(429, headers={"Retry-After": "4"})
        first = asyncio.create_task(status_of(http, patient.proxy_url, "/ifs/_test/echo/first"))

        async def learned() -> bool:
            return await hasty.broker.coordinator.wait_window("ifs") > 1

        await eventually(learned, 5, "the window reaches the other replica")
        async with asyncio.timeout(2):
            async with http.get(f"{hasty.proxy_url}/ifs/_test/echo/hasty") as resp:
                assert resp.status == 429
                assert resp.headers["X-Broker-Error"] == "rate_limited"
                assert "retry.max_total" in (await resp.json())["error"]["message"]
        assert [r.status for r in ifs_sim.api_requests] == [429]  # the first, only
        assert (
            metric(
                hasty, "erp_broker_backoff_seconds_total", connector="ifs", reason="rate_limited"
            )
            == 0
        )
        assert await first == 200
        assert (
            metric(
                patient, "erp_broker_backoff_seconds_total", connector="ifs", reason="rate_limited"
            )
            >= 3
        )

    async def test_shared_budget_keeps_the_fleet_under_the_quota(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """rate_limit 5 per second on each of three replicas: the ERP sees at most 5 in any second from all of them."""
        connector = ifs_connector(ifs_sim, ca_file, rate_limit={"requests": 5, "per_seconds": 1.0})
        fleet = await start_fleet(make_broker, 3, connector, fleet_store(redis_url))
        bases = [s.proxy_url for s in fleet]
        # Warm up first: new TLS connections' handshakes would blur the times at the ERP.
        assert await spread(http, bases, 6) == [200] * 6
        started = time.monotonic()
        assert await spread(http, bases, 20) == [200] * 20
        elapsed = time.monotonic() - started
        times = sorted(r.time for r in ifs_sim.api_requests)[6:]
        assert len(times) == 20
        # Any 6 consecutive requests span at least the window, less scheduling jitter: three
        # budgets of their own would let 15 through in a second.
        spans = [times[i + 5] - times[i] for i in range(len(times) - 5)]
        assert min(spans) >= 1.0 - 0.15, spans
        assert elapsed >= 3.0 - 0.15  # 20 requests, 5 per second, at most 5 at once


# -- Redis away --------------------------------------------------------------------------------


class TestRedisOutage:
    async def test_restart_mid_traffic_loses_no_request(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        own_redis: RedisServer,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Redis stops under load: requests go on with held tokens (and local refreshes); once it is back the
        replicas resynchronise and a new replica adopts the fleet's token without a login."""
        logs = LogRecorder()
        monkeypatch.setattr(redis_store, "log", logs)
        connector = ifs_connector(ifs_sim, ca_file)
        store = fleet_store(own_redis.url, timeout=0.5)
        fleet = await start_fleet(make_broker, 2, connector, store)
        await asyncio.gather(*(s.broker.wait_ready(5) for s in fleet))
        traffic = Traffic(http, [s.proxy_url for s in fleet])
        try:
            await traffic.wait_for(20)
            own_redis.kill()
            async with asyncio.timeout(3):
                await asyncio.gather(*(store_of(s).wait_state(False) for s in fleet))
            assert all(metric(s, "erp_broker_store_up") == 0 for s in fleet)
            assert all(s.broker.store_status()["up"] is False for s in fleet)
            await traffic.wait_for(20)
            # Tokens die while Redis is away: each replica refreshes on its own and goes on.
            ifs_sim.expire_all_tokens()
            await ifs_sim.wait_for_token_requests(2, timeout=5, grant="refresh_token")
            await traffic.wait_for(20)
            own_redis.start()
            async with asyncio.timeout(5):
                await asyncio.gather(*(store_of(s).wait_state(True) for s in fleet))
            await traffic.wait_for(20)
        finally:
            statuses = await traffic.stop()
        assert len(statuses) >= 80 and set(statuses) == {200}
        assert all(metric(s, "erp_broker_store_up") == 1 for s in fleet)
        assert (
            len(logs.events("store_down")) == 2 and len(logs.events("store_up")) == 2
        )  # one per replica
        assert logs.events("store_resynchronised")
        requests_before = ifs_sim.count_token_requests()
        newcomer = await make_broker({"ifs": connector}, store=store)
        await newcomer.broker.connectors["ifs"].tokens.wait_usable(5)
        assert await status_of(http, newcomer.proxy_url, "/ifs/_test/echo/new") == 200
        assert ifs_sim.count_token_requests() == requests_before

    async def test_start_without_redis_then_resynchronise(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        own_redis: RedisServer,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Redis down at start: the replica starts, logs in on its own and serves; when Redis comes, its token is written there."""
        own_redis.kill()
        connector = ifs_connector(ifs_sim, ca_file)
        store = fleet_store(own_redis.url, timeout=0.5)
        alone = await make_broker({"ifs": connector}, store=store)
        assert alone.broker.store_status()["up"] is False
        assert await status_of(http, alone.proxy_url, "/ifs/_test/echo/alone") == 200
        # Serving from memory: still ready, with the store's state in the readiness detail.
        async with http.get(f"{alone.admin_url}/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200
        assert ready["store"]["type"] == "redis" and ready["store"]["up"] is False
        own_redis.start()
        async with asyncio.timeout(5):
            await store_of(alone).wait_state(True)
        second = await make_broker({"ifs": connector}, store=store)
        await second.broker.connectors["ifs"].tokens.wait_usable(5)
        assert ifs_sim.count_token_requests() == 1

    async def test_hung_redis_never_hangs_a_request(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        own_redis: RedisServer,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A frozen Redis costs a request at most the store timeout, later ones nothing; thawed, it is used again."""
        # With a rate_limit every request takes from the shared budget: it needs Redis.
        connector = ifs_connector(ifs_sim, ca_file, rate_limit={"requests": 1000, "per_seconds": 1})
        # A store timeout long enough that one request waiting for Redis is told apart from
        # scheduling delays on a loaded machine.
        server = await make_broker(
            {"ifs": connector}, store=fleet_store(own_redis.url, timeout=2.0)
        )
        await server.broker.wait_ready(5)
        own_redis.pause()
        try:
            started = time.monotonic()
            assert await status_of(http, server.proxy_url, "/ifs/_test/echo/frozen") == 200
            assert time.monotonic() - started < 2.0 + 1.0
            assert store_of(server).up is False
            started = time.monotonic()
            assert await spread(http, [server.proxy_url], 20) == [200] * 20
            assert time.monotonic() - started < 2.0  # none of them waited for Redis
        finally:
            own_redis.resume()
        async with asyncio.timeout(5):
            await store_of(server).wait_state(True)
        assert server.broker.store_status()["up"] is True


# -- at rest and in transit ---------------------------------------------------------------------


class TestTokensAtRest:
    async def test_encrypted_tokens_hold_no_token_in_clear(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        inspect: redis.asyncio.Redis,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """With encryption_key, Redis holds a sealed value under erp-broker:token:<connector>:<fingerprint>."""
        key = base64.b64encode(os.urandom(32)).decode()
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)},
            store=fleet_store(redis_url, encryption_key=key),
        )
        assert await status_of(http, server.proxy_url, "/ifs/_test/echo/x") == 200
        token = server.broker.connectors["ifs"].tokens.current
        assert token is not None and token.refresh
        [name] = [k async for k in inspect.scan_iter(match="erp-broker:{*}:token:*")]
        assert name.decode().startswith("erp-broker:{ifs}:token:ifs:")
        raw = await inspect.get(name)
        assert raw.startswith(b"EB1")
        for secret in (token.access, token.refresh, *token.access.split(".")):
            assert secret.encode() not in raw

    async def test_another_key_is_a_startup_error(
        self, ifs_sim: IfsApps10Sim, ca_file: str, redis_url: str, make_broker: BrokerFactory
    ) -> None:
        """A replica started with a different encryption_key refuses to start, naming the setting."""
        first = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)},
            store=fleet_store(redis_url, encryption_key=base64.b64encode(os.urandom(32)).decode()),
        )
        await first.broker.wait_ready(5)
        with pytest.raises(EncryptionKeyError, match="encryption_key"):
            await make_broker(
                {"ifs": ifs_connector(ifs_sim, ca_file)},
                store=fleet_store(
                    redis_url, encryption_key=base64.b64encode(os.urandom(32)).decode()
                ),
            )


class TestTlsAndPassword:
    @pytest.fixture
    def tls_redis(self, tls_ca: trustme.CA, ca_file: str, tmp_path: Path) -> Iterator[RedisServer]:
        cert = tls_ca.issue_cert("127.0.0.1")
        cert_file, key_file = tmp_path / "redis.crt", tmp_path / "redis.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        server = RedisServer(
            tmp_path,
            password="redis-pass-0123456789",
            tls=RedisTls(str(cert_file), str(key_file), ca_file),
        ).start()
        yield server
        server.kill()

    async def test_rediss_with_a_password_from_a_file(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        tls_redis: RedisServer,
        tmp_path: Path,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """rediss:// with the server's CA and store.redis_password from ${file:}: tokens are shared; the password is shown nowhere."""
        secret = tmp_path / "redis-password"
        secret.write_text(f"{tls_redis.password}\n")
        url = f"{tls_redis.url}?ssl_ca_certs={ca_file}"
        store = fleet_store(url, redis_password=f"${{file:{secret}}}")
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)}, store=store)
        assert await status_of(http, server.proxy_url, "/ifs/_test/echo/tls") == 200
        assert server.broker.store_status()["up"] is True
        second = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)}, store=store)
        await second.broker.connectors["ifs"].tokens.wait_usable(5)
        assert ifs_sim.count_token_requests() == 1
        assert tls_redis.password not in repr(server.broker.store_status())
        assert tls_redis.password not in str(server.broker.config.redacted())

    async def test_wrong_password_is_a_startup_error(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        tls_redis: RedisServer,
        make_broker: BrokerFactory,
    ) -> None:
        """A password Redis refuses stops the start with a message naming store.redis_password, not the password."""
        url = f"rediss://:not-the-password-42@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={ca_file}"
        with pytest.raises(StoreError, match="redis_password") as caught:
            await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)}, store=fleet_store(url))
        assert "not-the-password-42" not in str(caught.value)

    async def test_unverified_server_certificate_is_a_startup_error(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        tls_redis: RedisServer,
        make_broker: BrokerFactory,
    ) -> None:
        """rediss:// to a server whose CA is not given: the start fails and says how to give the CA."""
        with pytest.raises(StoreError, match="ssl_ca_certs"):
            await make_broker(
                {"ifs": ifs_connector(ifs_sim, ca_file)},
                store=fleet_store(tls_redis.url, redis_password=tls_redis.password),
            )


class TestUpgrade:
    async def test_token_under_the_name_before_hash_tags_is_adopted(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        redis_url: str,
        inspect: redis.asyncio.Redis,
        make_broker: BrokerFactory,
    ) -> None:
        """A token stored by a release before hash tags (erp-broker:token:<key>) is read after an upgrade: no login."""
        connector = ifs_connector(ifs_sim, ca_file)
        first = await make_broker({"ifs": connector}, store=fleet_store(redis_url))
        await first.broker.wait_ready(5)
        [name] = [k async for k in inspect.scan_iter(match="erp-broker:{ifs}:token:*")]
        await inspect.rename(name, name.replace(b"erp-broker:{ifs}:token:", b"erp-broker:token:"))
        upgraded = await make_broker({"ifs": connector}, store=fleet_store(redis_url))
        await upgraded.broker.connectors["ifs"].tokens.wait_usable(5)
        assert ifs_sim.count_token_requests() == 1
