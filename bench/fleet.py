"""The fleet scenario: replicas of erp-broker sharing one Redis, against one service account.

Measures, for 1 and 3 replicas on Redis, on Redis Sentinel (a primary, a replica, three
sentinels), on a three-node Redis Cluster (and, for contrast, 1 and 3 replicas each with a
SQLite store of its own):

* token requests per rotation: short-lived tokens with rotating refresh tokens; a fleet on
  Redis should make one token request per expiry however many replicas it has;
* refresh tokens the IdP rejected (a replica redeeming a superseded one): should be 0;
* request throughput and latency through the replicas, round robin, with errors counted;
* on Sentinel, a failover under load: the primary is killed (SIGKILL) and the time until the
  sentinels promote the replica and until every replica uses the new primary is measured,
  with the requests that failed meanwhile (should be 0: tokens are held in memory).

    python -m bench.fleet [--quick] [--write]

Everything runs on loopback: redis-server and the IdP/ERP simulator (``bench.fleet sim``, an
IFS Apps 10 simulator with rotating refresh tokens) on the load core, every replica on the
system-under-test core (so 3 replicas share one core: the difference from 1 replica is what
coordinating through Redis costs, not extra CPU). ``--write`` puts the table into
bench/RESULTS.md between the ``fleet`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from .procs import LOAD_CPU, SUT_CPU, Proc, free_port, http_get, wait_port
from .runner import CLIENT_ID, CLIENT_SECRET, PASSWORD, TOKEN_PATH, USER

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The broker refreshes at 80 % of a token's lifetime (20 % ahead, at most 5 minutes).
REFRESH_AT = 0.8


@dataclass(frozen=True)
class Settings:
    lifetime: int = 5
    duration: float = 30.0
    connections: int = 32
    warmup: float = 2.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(lifetime=3, duration=10.0, connections=16, warmup=1.0)


@dataclass(frozen=True)
class Scenario:
    store: str  # "redis", "sentinel", "cluster" or "sqlite"
    replicas: int

    @property
    def name(self) -> str:
        return f"{self.store} x {self.replicas}"


SCENARIOS = (
    Scenario("sqlite", 1),
    Scenario("redis", 1),
    Scenario("redis", 3),
    Scenario("sentinel", 1),
    Scenario("sentinel", 3),
    Scenario("cluster", 1),
    Scenario("cluster", 3),
    Scenario("sqlite", 3),
)


# -- the simulator process ---------------------------------------------------------------------


async def serve_sim(lifetime: int) -> None:
    """An IFS Apps 10 simulator with rotating refresh tokens; prints its URL."""
    from .token_server import BenchIfsSim

    sim = BenchIfsSim(token_lifetime=lifetime, refresh_lifetime=3600, rotate_refresh=True)
    print(await sim.start("127.0.0.1", 0), flush=True)
    await asyncio.Event().wait()


# -- the run -----------------------------------------------------------------------------------


class Fleet:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.dir = workdir
        self.procs: list[Proc] = []
        self.redis_port = free_port()
        self.sim = ""
        self.sentinels: Any = None
        self.cluster: Any = None

    def spawn(self, name: str, argv: list[str], cpu: int) -> Proc:
        proc = Proc(name, argv, cpu, self.dir / f"{name}.log", cwd=ROOT)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.spawn(
            "redis",
            [
                server,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            LOAD_CPU,
        )
        wait_port(self.redis_port)
        # The test suite's fixtures: loopback, free ports, short Sentinel timeouts
        # (down-after-milliseconds 400, failover-timeout 2000).
        from tests.redis_server import ClusterGroup, SentinelGroup

        for sub in ("sentinel", "cluster"):
            (self.dir / sub).mkdir(exist_ok=True)
        self.sentinels = SentinelGroup(self.dir / "sentinel")
        self.cluster = ClusterGroup(self.dir / "cluster")
        self.sentinels.start()
        self.cluster.start()
        for server in [
            self.sentinels.primary,
            self.sentinels.replica,
            *self.sentinels.sentinels,
            *self.cluster.nodes,
        ]:
            assert server.process is not None
            with contextlib.suppress(OSError):
                os.sched_setaffinity(server.process.pid, {LOAD_CPU})
        sim = self.spawn(
            "sim",
            [sys.executable, "-m", "bench.fleet", "sim", "--lifetime", str(self.s.lifetime)],
            LOAD_CPU,
        )
        deadline = time.monotonic() + 15
        while not self.sim:
            lines = sim.log.read_text(errors="replace").splitlines()
            self.sim = next((line.strip() for line in lines if line.startswith("http://")), "")
            if time.monotonic() > deadline or not sim.alive():
                raise RuntimeError(f"the simulator did not start:\n{sim.tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        for group in (self.sentinels, self.cluster):
            if group is not None:
                group.kill()

    def token_requests(self) -> list[dict[str, Any]]:
        status, body = http_get(f"{self.sim}/_bench/token-times")
        assert status == 200, body
        requests: list[dict[str, Any]] = orjson.loads(body)["token_requests"]
        return requests

    def flush_redis(self, store: str) -> None:
        import redis

        if store == "cluster":
            self.cluster.flush()
            return
        port = self.sentinels.primary_port() if store == "sentinel" else self.redis_port
        with redis.Redis(port=port) as client:
            client.flushall()

    def store_url(self, store: str) -> str:
        if store == "sentinel":
            return str(self.sentinels.url)
        if store == "cluster":
            return str(self.cluster.url)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_replicas(self, scenario: Scenario) -> list[tuple[Proc, int, int]]:
        """Start the replicas, wait until each is ready; (process, port, admin port) each."""
        replicas = []
        exe = shutil.which("erp-broker")
        argv = [exe, "run"] if exe else [sys.executable, "-m", "broker", "run"]
        for i in range(scenario.replicas):
            port, admin = free_port(), free_port()
            name = f"{scenario.store}{scenario.replicas}-{i}"
            store: dict[str, Any] = (
                {"sqlite": str(self.dir / f"{name}.db")}
                if scenario.store == "sqlite"
                else {"redis": self.store_url(scenario.store)}
            )
            config = {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "store": store,
                "log_format": "json",
                "access_log": False,
                "connectors": {
                    "erp": {
                        "type": "ifs_apps10",
                        "base_url": self.sim,
                        "token_url": self.sim + TOKEN_PATH,
                        "client_id": CLIENT_ID,
                        "client_secret": CLIENT_SECRET,
                        "username": USER,
                        "password": PASSWORD,
                    }
                },
            }
            path = self.dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            replicas.append((self.spawn(name, [*argv, "-c", str(path)], SUT_CPU), port, admin))
        for proc, _, admin in replicas:
            _wait_ready(proc, admin)
        return replicas

    def run(self, scenario: Scenario) -> dict[str, Any]:
        if scenario.store != "sqlite":
            self.flush_redis(scenario.store)
        before = len(self.token_requests())
        replicas = self.start_replicas(scenario)
        urls = [f"http://127.0.0.1:{port}/erp/_test/echo/fleet" for _, port, _ in replicas]
        try:
            asyncio.run(load(urls, self.s.connections, self.s.warmup))
            window_start = len(self.token_requests())
            result = asyncio.run(load(urls, self.s.connections, self.s.duration))
            during = self.token_requests()[window_start:]
            logins = len(self.token_requests()[before:window_start])
        finally:
            for proc, _, _ in replicas:
                proc.stop()
                self.procs.remove(proc)
        rotations = self.s.duration / (REFRESH_AT * self.s.lifetime)
        return {
            **result,
            "scenario": scenario.name,
            "startup_token_requests": logins,
            "token_requests": len(during),
            "per_rotation": len(during) / rotations,
            "rejected": sum(1 for r in during if r["status"] != 200),
        }

    def failover(self) -> dict[str, Any]:
        """Three replicas on Sentinel under load; SIGKILL the primary and time the recovery."""
        self.flush_redis("sentinel")
        replicas = self.start_replicas(Scenario("sentinel", 3))
        urls = [f"http://127.0.0.1:{port}/erp/_test/echo/fleet" for _, port, _ in replicas]
        admins = [admin for _, _, admin in replicas]
        try:
            return asyncio.run(self._failover(urls, admins))
        finally:
            for proc, _, _ in replicas:
                proc.stop()
                self.procs.remove(proc)

    async def _failover(self, urls: list[str], admins: list[int]) -> dict[str, Any]:
        duration = max(8.0, self.s.duration / 2)
        traffic = asyncio.create_task(load(urls, self.s.connections, duration))
        await asyncio.sleep(1.0)  # under load before the kill
        self.sentinels.primary.kill()
        killed = time.monotonic()
        promoted = await asyncio.to_thread(self._promoted_after, killed)
        pending = set(admins)
        deadline = killed + 30
        while pending and time.monotonic() < deadline:
            for admin in list(pending):
                with contextlib.suppress(OSError, ValueError):
                    status, body = http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)
                    if status == 200 and orjson.loads(body)["store"]["up"]:
                        pending.discard(admin)
            await asyncio.sleep(0.02)
        recovered = time.monotonic() - killed if not pending else float("nan")
        result = await traffic
        return {**result, "promoted_s": promoted, "recovered_s": recovered}

    def _promoted_after(self, killed: float) -> float:
        self.sentinels.wait_promoted(30)
        return time.monotonic() - killed


def _wait_ready(proc: Proc, admin: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                return
        if not proc.alive():
            break
        time.sleep(0.01)
    raise RuntimeError(f"{proc.name} never became ready:\n{proc.tail()}")


async def load(urls: list[str], connections: int, duration: float) -> dict[str, Any]:
    """``connections`` clients, each sending one request after another, round robin."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                async with session.get(urls[n % len(urls)]) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            n += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session, i) for i in range(connections)))
        elapsed = time.monotonic() - started
    latencies.sort()
    pick = (
        (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000)
        if latencies
        else (lambda q: 0.0)
    )
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else 0.0,
    }


def table(results: list[dict[str, Any]], s: Settings) -> str:
    lines = [
        f"Tokens live {s.lifetime} s (refreshed every {REFRESH_AT * s.lifetime:g} s, refresh tokens "
        f"rotate); {s.duration:g} s of load from {s.connections} connections, round robin over the "
        "replicas; every replica on one core.",
        "",
        "| store x replicas | start-up token requests | token requests under load | per rotation | refresh tokens rejected | requests/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['scenario']} | {r['startup_token_requests']} | {r['token_requests']} | {r['per_rotation']:.2f} | {r['rejected']} | "
            f"{r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |"
        )
    return "\n".join(lines)


def failover_table(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "Failover under load (Sentinel, 3 replicas, `down-after-milliseconds` 400, "
            "`failover-timeout` 2000): the primary is killed with SIGKILL.",
            "",
            "| sentinels promote the replica | every replica on the new primary | requests/s "
            "(whole run) | p99 ms | failed requests |",
            "|---:|---:|---:|---:|---:|",
            f"| {r['promoted_s']:.1f} s | {r['recovered_s']:.1f} s | {r['rps']:.0f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("mode", nargs="?", choices=["run", "sim"], default="run")
    parser.add_argument("--lifetime", type=int, default=Settings.lifetime)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.mode == "sim":
        asyncio.run(serve_sim(args.lifetime))
        return 0
    settings = Settings.quick() if args.quick else Settings()
    with tempfile.TemporaryDirectory(prefix="erp-broker-fleet-") as tmp:
        fleet = Fleet(settings, Path(tmp))
        try:
            fleet.start()
            results = [fleet.run(scenario) for scenario in SCENARIOS]
            failover = fleet.failover()
        finally:
            fleet.stop()
    body = table(results, settings) + "\n\n" + failover_table(failover)
    print(body)
    if args.write:
        from .runner import update_results

        update_results("fleet", f"### Fleet on Redis (`python -m bench.fleet`)\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
