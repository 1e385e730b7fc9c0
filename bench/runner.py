"""The benchmark: every scenario in one run, on loopback, then a table and bench/RESULTS.md.

Every scenario runs twice: with plain HTTP to the origin, and with TLS to it (a throwaway CA
that nginx, the minimal proxy and erp-broker all verify), since every real ERP is HTTPS.

Layout on a 2-core machine: the system under test (nginx proxy, minimal aiohttp proxy,
erp-broker) is pinned to core 0; the origin (nginx), the token server, the upload sink and
the load generators (wrk, ``bench.loadgen``, curl) run on core 1. Every proxy is started
before the first measurement and the scenarios are interleaved run by run, so slow drift of
the machine hits them all alike. Results are medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trustme
import yaml

from broker import memory

from . import nginx
from .procs import (
    LOAD_CPU,
    SUT_CPU,
    Proc,
    free_port,
    http_get,
    http_post,
    wait_port,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
MIB = 1024 * 1024
CLIENT_ID, CLIENT_SECRET, USER, PASSWORD = (
    "erp-broker",
    "ifs-client-secret",
    "IFSAPP",
    "ifs-password",
)
TOKEN_PATH = "/auth/realms/ifsapps/protocol/openid-connect/token"
#: Suffix of the scenarios that reach the origin over TLS.
TLS = "/TLS"


@dataclass(frozen=True)
class Settings:
    runs: int = 3
    warmup: float = 3.0
    duration: float = 8.0
    connections: int = 50
    rate: float = 1000.0
    rate_duration: float = 15.0
    mib_duration: float = 5.0
    mib_connections: int = 8
    scaling: tuple[int, ...] = (10, 100, 1000)
    scaling_duration: float = 5.0
    stream_bytes: int = 1024 * MIB
    burst: int = 1000
    #: The cold broker's first token request is held at the token server until every request
    #: of the burst is sent (opening 1,000 connections takes a second or more here), then
    #: answered after this delay.
    cold_token_delay: float = 0.1
    refresh_token_delay: float = 0.5
    refresh_lifetime: int = 10
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(
            runs=1,
            warmup=1.0,
            duration=4.0,
            rate_duration=6.0,
            mib_duration=3.0,
            scaling_duration=3.0,
            quick=True,
        )


# -- load tools ------------------------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        return float("nan")
    return float(match[1]) * _UNIT[match[2]]


def wrk(url: str, connections: int, duration: float, headers: list[str] = ()) -> dict[str, Any]:
    argv = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s"]
    argv += ["--latency", "--timeout", "10s"]
    for header in headers:
        argv += ["-H", header]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60).stdout
    result: dict[str, Any] = {"errors": 0, "non2xx": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif re.match(r"^\d+ requests in", line):
            result["requests"] = int(line.split()[0])
        elif line.startswith("50%"):
            result["p50_ms"] = _ms(line.split()[1])
        elif line.startswith("99%"):
            result["p99_ms"] = _ms(line.split()[1])
        elif line.startswith("Socket errors:"):
            result["errors"] = sum(int(n) for n in re.findall(r"\d+", line))
        elif line.startswith("Non-2xx"):
            result["non2xx"] = int(line.split()[-1])
    if "rps" not in result:
        raise RuntimeError(f"wrk failed on {url}:\n{out}")
    return result


def loadgen(*args: str, timeout: float = 700) -> dict[str, Any]:
    argv = ["taskset", "-c", str(LOAD_CPU), sys.executable, "-m", "bench.loadgen", *args]
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed: {proc.stderr.decode(errors='replace')}")
    return orjson.loads(proc.stdout)


def curl(*args: str) -> dict[str, float]:
    argv = ["taskset", "-c", str(LOAD_CPU), "curl", "-sS", "-o", "/dev/null", "-H", "Expect:"]
    argv += ["-w", "%{http_code} %{size_download} %{size_upload} %{time_total}", *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout.split()
    return {
        "status": int(out[0]),
        "down": float(out[1]),
        "up": float(out[2]),
        "seconds": float(out[3]),
    }


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


# -- the processes ---------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach the origin: directly, or through one proxy."""

    name: str
    base: str  # URL prefix; + "/small", + "/1m"
    proc: Proc | None = None
    headers: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.dir = workdir
        self.procs: list[Proc] = []
        self.origin_port = free_port()
        self.origin = ""
        self.tls_port = free_port()
        self.origin_tls = ""
        self.ca_file = workdir / "ca.pem"
        self.token_url = ""
        self.sink = ""
        self.token = ""

    # -- lifecycle -------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], cpu: int, **kw: Any) -> Proc:
        proc = Proc(name, argv, cpu, self.dir / f"{name}.log", cwd=kw.pop("cwd", ROOT), **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()

    def _url_from_log(self, proc: Proc, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in proc.log.read_text(errors="replace").splitlines():
                if line.startswith("http://"):
                    return line.strip()
            if not proc.alive():
                break
            time.sleep(0.02)
        raise RuntimeError(f"{proc.name} did not start:\n{proc.tail()}")

    def start_token_server(
        self, name: str, lifetime: int, delay: float = 0.0, *, gate_closed: bool = False
    ) -> str:
        proc = self.spawn(
            name,
            [
                sys.executable,
                "-m",
                "bench.token_server",
                "--token-lifetime",
                str(lifetime),
                "--token-delay",
                str(delay),
                *(["--gate-closed"] if gate_closed else []),
            ],
            LOAD_CPU,
        )
        return self._url_from_log(proc)

    def start_origin(self) -> None:
        www = self.dir / "www"
        www.mkdir()
        (www / "1m").write_bytes(os.urandom(MIB))
        with (www / "stream").open("wb") as f:
            f.truncate(self.s.stream_bytes)  # sparse: served from the page cache
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        cert, key = self.dir / "origin-cert.pem", self.dir / "origin-key.pem"
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        config = nginx.origin_config(
            self.dir, self.origin_port, tls_port=self.tls_port, cert=cert, key=key
        )
        self.spawn("origin", nginx.argv(self.dir, config), LOAD_CPU)
        wait_port(self.origin_port)
        wait_port(self.tls_port)
        self.origin = f"http://127.0.0.1:{self.origin_port}"
        self.origin_tls = f"https://localhost:{self.tls_port}"

    def handshakes(self) -> int:
        """TLS connections the origin has accepted so far (one log line each)."""
        path = self.dir / "handshakes.log"
        return len(path.read_bytes().splitlines()) if path.exists() else 0

    def start_sink(self) -> None:
        proc = self.spawn("sink", [sys.executable, "-m", "bench.sink"], LOAD_CPU)
        self.sink = self._url_from_log(proc)

    def fetch_token(self, token_server: str) -> str:
        form = (
            f"grant_type=password&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
            f"&username={USER}&password={PASSWORD}"
        ).encode()
        status, body = http_post(
            token_server + TOKEN_PATH, form, "application/x-www-form-urlencoded"
        )
        if status != 200:
            raise RuntimeError(f"token server answered {status}: {body[:200]!r}")
        return str(orjson.loads(body)["access_token"])

    def broker_config(
        self,
        name: str,
        token_server: str,
        *,
        base_url: str | None = None,
        sink: bool = False,
        tls: bool = False,
    ) -> tuple[Path, int, int]:
        port, admin = free_port(), free_port()
        connector = {
            "type": "ifs_apps10",
            "token_url": token_server + TOKEN_PATH,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "username": USER,
            "password": PASSWORD,
        }
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "store": {"sqlite": str(self.dir / f"{name}.db")},
            "log_level": "info",
            "log_format": "json",
            "connectors": {"origin": {**connector, "base_url": base_url or self.origin}},
        }
        if tls:
            config["connectors"]["origin"]["base_url"] = self.origin_tls
            config["connectors"]["origin"]["ca_file"] = str(self.ca_file)
        if sink:  # a second connector, for the upload half of the streaming test
            config["connectors"]["sink"] = {**connector, "base_url": self.sink}
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, port, admin

    def start_broker(self, name: str, config: Path, admin: int, *, ready: bool = True) -> Proc:
        # The console script users run; its stdout (the JSON log, access lines included)
        # goes to a file, as a sidecar's would go to the container runtime.
        exe = shutil.which("erp-broker")
        argv = [exe, "run"] if exe else [sys.executable, "-m", "broker", "run"]
        proc = self.spawn(name, [*argv, "-c", str(config)], SUT_CPU)
        if ready:
            self.wait_ready(proc, admin)
        return proc

    def wait_ready(self, proc: Proc, admin: int, timeout: float = 20.0) -> float:
        """Seconds from the process start until /readyz said 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                    return time.monotonic() - proc.started_at
            if not proc.alive():
                break
            time.sleep(0.005)
        raise RuntimeError(f"{proc.name} never became ready:\n{proc.tail()}")

    # -- the side-by-side part ---------------------------------------------------------------

    def targets(self, *, tls: bool = False) -> list[Target]:
        """direct, nginx, minimal, erp-broker: to the plain origin, or (``tls``) to the TLS one."""
        token = self.token
        auth = f"Bearer {token}"
        suffix = TLS if tls else ""
        origin = self.origin_tls if tls else self.origin
        tag = "-tls" if tls else ""
        direct = Target(f"direct{suffix}", origin, headers=[f"Authorization: {auth}"])
        port = free_port()
        config = nginx.proxy_config(
            self.dir,
            port,
            self.tls_port if tls else self.origin_port,
            auth,
            ca_file=self.ca_file if tls else None,
        )
        ngx = Target(
            f"nginx{suffix}",
            f"http://127.0.0.1:{port}",
            self.spawn(f"nginx-proxy{tag}", nginx.argv(self.dir, config), SUT_CPU),
        )
        wait_port(port)
        port = free_port()
        minimal = Target(
            f"minimal{suffix}",
            f"http://127.0.0.1:{port}",
            self.spawn(
                f"minimal{tag}",
                [
                    sys.executable,
                    "-m",
                    "bench.minimal_proxy",
                    "--port",
                    str(port),
                    "--upstream",
                    origin,
                    "--auth",
                    auth,
                    *(["--ca-file", str(self.ca_file)] if tls else []),
                ],
                SUT_CPU,
            ),
        )
        wait_port(port)
        config_path, port, admin = self.broker_config(
            f"broker{tag}", self.token_url, sink=not tls, tls=tls
        )
        proc = self.start_broker(f"broker{tag}", config_path, admin)
        broker = Target(f"erp-broker{suffix}", f"http://127.0.0.1:{port}/origin", proc)
        broker.results["admin"] = admin
        broker.results["config"] = config_path
        return [direct, ngx, minimal, broker]

    def check(self, target: Target) -> None:
        headers = dict(h.split(": ", 1) for h in target.headers)
        context = ssl.create_default_context(cafile=self.ca_file)
        status, body = http_get(target.base + "/small", headers=headers, context=context)
        auth = orjson.loads(body).get("auth", "") if status == 200 else ""
        if status != 200 or not auth.startswith("Bearer ey"):
            raise RuntimeError(f"{target.name}: /small answered {status} {body[:200]!r}")
        target.results["body_bytes"] = len(body)

    def side_by_side(self, targets: list[Target]) -> None:
        s = self.s
        for t in targets:
            self.check(t)
            if t.proc:
                t.results["rss_idle"] = t.proc.rss_mib()
        print(f"warm-up {s.warmup:g}s each", flush=True)
        for t in targets:
            wrk(t.base + "/small", s.connections, s.warmup, t.headers)
        for key, path, conns, duration in (
            ("small", "/small", s.connections, s.duration),
            ("mib", "/1m", s.mib_connections, s.mib_duration),
        ):
            for run in range(s.runs):
                for t in targets:
                    if key == "mib" and t.proc and run == 0:
                        t.results["rss_before_mib"] = t.proc.rss_mib()
                        t.proc.reset_peak()
                    cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
                    shakes0 = self.handshakes()
                    r = wrk(t.base + path, conns, duration, t.headers)
                    r["handshakes"] = self.handshakes() - shakes0
                    if t.proc:
                        r["cpu_us"] = (t.proc.cpu_seconds() - cpu0) * 1e6 / max(1, r["requests"])
                    t.results.setdefault(key, []).append(r)
                    print(
                        f"  {key} run {run + 1}/{s.runs} {t.name:10} {r['rps']:10.0f} req/s"
                        f"  p99 {r['p99_ms']:.2f} ms"
                        + (f"  {r.get('cpu_us', 0):.0f} µs/req" if t.proc else "")
                        + (f"  {r['handshakes']} TLS handshakes" if t.name.endswith(TLS) else ""),
                        flush=True,
                    )
            if key == "mib":
                # Memory given back after a burst of large answers: the broker looks every
                # INTERVAL seconds while idle; read RSS once it has had the chance.
                time.sleep(memory.INTERVAL + 2.0)
                for t in targets:
                    if t.proc:
                        t.results["rss_peak_mib"] = t.proc.peak_mib()
                        t.results["rss_after_mib"] = t.proc.rss_mib()
        for t in targets:
            r = loadgen(
                "rate",
                t.base + "/small",
                "--rate",
                str(s.rate),
                "--duration",
                str(s.rate_duration),
                *[arg for h in t.headers for arg in ("-H", h)],
                "--ca-file",
                str(self.ca_file),
            )
            t.results["rate"] = r
            lat = r["latency"]
            print(
                f"  {s.rate:g}/s {t.name:10} p50 {lat['p50_ms']:.3f} p99 {lat['p99_ms']:.3f} ms "
                f"(sent {r['achieved_rate']:.0f}/s, statuses {r['statuses']})",
                flush=True,
            )
        for n in s.scaling:
            for t in targets:
                if t.proc and n == max(s.scaling):
                    t.proc.reset_peak()
                r = wrk(t.base + "/small", n, s.scaling_duration, t.headers)
                if t.proc and n == max(s.scaling):
                    t.results["rss_conns"] = t.proc.peak_mib()
                t.results.setdefault("scaling", {})[n] = r
                print(
                    f"  c{n:<5} {t.name:10} {r['rps']:10.0f} req/s  p99 {r['p99_ms']:.2f} ms"
                    f"  errors {r['errors']}",
                    flush=True,
                )
        for t in targets:
            if t.proc:
                t.results["rss_after"] = t.proc.rss_mib()

    # -- erp-broker only -------------------------------------------------------------------

    def streaming(self, broker: Target) -> dict[str, Any]:
        assert broker.proc is not None
        out: dict[str, Any] = {"bytes": self.s.stream_bytes}
        direct = curl(self.origin + "/stream")
        out["direct_mib_s"] = direct["down"] / MIB / direct["seconds"]
        for direction in ("download", "upload"):
            broker.proc.reset_peak()
            before = broker.proc.rss_mib()
            if direction == "download":
                r = curl(broker.base + "/stream")
                moved = r["down"]
            else:
                sink = broker.base.rsplit("/", 1)[0] + "/sink/upload"
                r = curl("-T", str(self.dir / "www" / "stream"), sink)
                moved = r["up"]
            peak = broker.proc.peak_mib()
            out[direction] = {
                "status": r["status"],
                "bytes": moved,
                "mib_s": moved / MIB / r["seconds"],
                "rss_before": before,
                "rss_peak_growth": max(0.0, peak - before),
            }
            print(
                f"  1 GiB {direction}: {out[direction]['mib_s']:.0f} MiB/s, "
                f"peak RSS growth {out[direction]['rss_peak_growth']:.1f} MiB",
                flush=True,
            )
        return out

    def restart_ready(self, broker: Target) -> dict[str, Any]:
        """Stop the broker and start it again on the same store: ready within 1 s? Then the
        cold start's control: the same burst on a fresh process that has a token."""
        assert broker.proc is not None
        before = self.token_requests(self.token_url)
        broker.proc.stop()
        config: Path = broker.results["config"]
        proc = self.start_broker("broker-restart", config, broker.results["admin"], ready=False)
        seconds = self.wait_ready(proc, broker.results["admin"])
        after = self.token_requests(self.token_url)
        control = loadgen("burst", broker.base + "/small", "--count", str(self.s.burst))
        proc.stop()
        lat = control["latency"]
        print(
            f"  restart with a persisted token: ready in {seconds:.2f}s, "
            f"{len(after) - len(before)} token requests; first burst p50/p99/max "
            f"{lat['p50_ms']:.0f}/{lat['p99_ms']:.0f}/{lat['max_ms']:.0f} ms",
            flush=True,
        )
        return {"ready_s": seconds, "token_requests": len(after) - len(before), "burst": control}

    @staticmethod
    def token_requests(token_server: str) -> list[dict[str, Any]]:
        return list(
            orjson.loads(http_get(token_server + "/_bench/token-times")[1])["token_requests"]
        )

    @staticmethod
    def metric(admin: int, name: str) -> float:
        text = http_get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def token_path(self) -> dict[str, Any]:
        """Cold start with a burst, the same burst warm, then a fixed rate across a refresh."""
        s = self.s
        server = self.start_token_server(
            "token-server-cold", s.refresh_lifetime, s.cold_token_delay, gate_closed=True
        )
        config, port, admin = self.broker_config("broker-cold", server)
        url = f"http://127.0.0.1:{port}/origin/small"
        proc = self.start_broker("broker-cold", config, admin, ready=False)
        cold = loadgen(
            "burst",
            url,
            "--count",
            str(s.burst),
            "--wait-port",
            "30",
            "--then-post",
            server + "/_bench/open-gate",
        )
        tokens_cold = self.token_requests(server)
        waiters = self.metric(admin, "erp_broker_token_refresh_waiters_total")
        token_seconds = self.metric(admin, "erp_broker_token_request_duration_seconds_sum")
        warm = loadgen("burst", url, "--count", str(s.burst))
        # The refresh must end before the token is too old to send (0.9 of its lifetime).
        http_post(
            server + "/_sandbox/credentials", orjson.dumps({"token_delay": s.refresh_token_delay})
        )
        # A fixed rate across the refresh-ahead of the short-lived token.
        # The token's lifetime counts from its request's start (before the gate), so the
        # refresh is due 0.2 of a lifetime before the expiry the broker reports.
        expiry = self.metric(admin, "erp_broker_token_expiry_timestamp_seconds")
        refresh_at = expiry - 0.2 * s.refresh_lifetime
        duration = max(4.0, refresh_at + 3.0 - time.time())
        during = loadgen(
            "rate", url, "--rate", str(s.rate), "--duration", f"{duration:.1f}", "--samples"
        )
        tokens_all = self.token_requests(server)
        waiters_after = self.metric(admin, "erp_broker_token_refresh_waiters_total")
        proc.stop()
        out: dict[str, Any] = {
            "token_delay": s.cold_token_delay,
            # How long the burst's requests waited for the token: from the moment they were
            # sent until the token endpoint answered (gate opened + its delay).
            "token_wait": (tokens_cold[0]["arrived"] + s.cold_token_delay - cold["sent_at"])
            if tokens_cold and "sent_at" in cold
            else float("nan"),
            "refresh_delay": s.refresh_token_delay,
            "cold": cold,
            "warm": warm,
            "cold_token_requests": len(tokens_cold),
            "token_seconds": token_seconds,
            "waiters": waiters,
        }
        refreshes = tokens_all[len(tokens_cold) :]
        samples = during["samples"]
        if refreshes:
            start = refreshes[0]["arrived"] - 0.005
            end = start + s.refresh_token_delay + 0.06
            inside = [lat for t, lat, _ in samples if start <= t <= end]
            outside = [lat for t, lat, _ in samples if not start <= t <= end]
        else:
            inside, outside = [], [lat for _, lat, _ in samples]
        out["refresh"] = {
            "token_requests": len(refreshes),
            "waiters": waiters_after - waiters,
            "inside": _pct(inside),
            "outside": _pct(outside),
            "statuses": during["statuses"],
        }
        lat_c, lat_w = cold["latency"], warm["latency"]
        print(
            f"  cold start: {len(tokens_cold)} token request(s) of {token_seconds * 1e3:.0f} ms "
            f"(the burst waited {out['token_wait'] * 1e3:.0f} ms of it), "
            f"{waiters:.0f} waiters; burst p50/p99/max {lat_c['p50_ms']:.0f}/{lat_c['p99_ms']:.0f}/"
            f"{lat_c['max_ms']:.0f} ms cold vs {lat_w['p50_ms']:.0f}/{lat_w['p99_ms']:.0f}/"
            f"{lat_w['max_ms']:.0f} ms warm; statuses {cold['statuses']}",
            flush=True,
        )
        r = out["refresh"]
        print(
            f"  refresh-ahead: {r['token_requests']} token request(s), {r['waiters']:.0f} waiters; "
            f"p99 during {r['inside'].get('p99_ms', float('nan')):.2f} ms "
            f"(n={r['inside']['n']}) vs {r['outside'].get('p99_ms', float('nan')):.2f} ms otherwise",
            flush=True,
        )
        return out


def _pct(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_ms": s[len(s) // 2] * 1e3,
        "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3,
        "max_ms": s[-1] * 1e3,
    }


# -- report ----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
            ).stdout.strip()
            or "unknown"
        )

    def version(argv: list[str]) -> str:
        with contextlib.suppress(Exception):
            p = subprocess.run(argv, capture_output=True, text=True)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        return "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]),
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def summarise(targets: list[Target]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        r = t.results
        small, mib = r["small"], r["mib"]
        out[t.name] = {
            "rps": median([x["rps"] for x in small]),
            "p50": median([x["p50_ms"] for x in small]),
            "p99": median([x["p99_ms"] for x in small]),
            "cpu_us": median([x["cpu_us"] for x in small]) if t.proc else None,
            "errors": sum(x["errors"] + x["non2xx"] for x in small),
            "mib_s": median([x["rps"] for x in mib]),  # 1 MiB bodies: req/s == MiB/s
            "rate_p50": r["rate"]["latency"]["p50_ms"],
            "rate_p99": r["rate"]["latency"]["p99_ms"],
            "rss_idle": r.get("rss_idle"),
            "rss_after": r.get("rss_after"),
            "rss_before_mib": r.get("rss_before_mib"),
            "rss_peak_mib": r.get("rss_peak_mib"),
            "rss_after_mib": r.get("rss_after_mib"),
            "rss_conns": r.get("rss_conns"),
            # TLS connections opened per 10,000 requests in the small-JSON runs.
            "handshakes_10k": 1e4
            * sum(x["handshakes"] for x in small)
            / max(1, sum(x["requests"] for x in small)),
            "scaling": {
                n: (x["rps"], x["p99_ms"], x["errors"] + x["non2xx"])
                for n, x in r["scaling"].items()
            },
        }
    return out


def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def tables(summary: dict[str, dict[str, Any]], s: Settings, suffix: str = "") -> str:
    """The side-by-side tables of the scenarios named with ``suffix`` ("" plain, TLS)."""
    summary = {name: r for name, r in summary.items() if name.endswith(TLS) == bool(suffix)}
    d, m, n = summary[f"direct{suffix}"], summary[f"minimal{suffix}"], summary[f"nginx{suffix}"]
    lines = [
        ("**TLS to the origin.** " if suffix else "**Plain HTTP to the origin.** ")
        + f"Small JSON (wrk -t1 -c{s.connections}, {s.runs}x{s.duration:g}s, median); "
        f"added latency at a fixed {s.rate:g} req/s (open loop, {s.rate_duration:g}s) is the "
        f"proxy's p50/p99 minus direct's; 1 MiB: wrk -c{s.mib_connections}.",
        "",
        "| scenario | req/s | x minimal | x nginx | CPU µs/req | p50 / p99 at c50 (ms) "
        f"| added p50 / p99 at {s.rate:g}/s (ms) | 1 MiB MiB/s | x direct | RSS idle / after (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        added = (
            "(reference: {} / {})".format(_f(r["rate_p50"], ".2f"), _f(r["rate_p99"], ".2f"))
            if name == f"direct{suffix}"
            else f"{_f(r['rate_p50'] - d['rate_p50'], '.2f')} / {_f(r['rate_p99'] - d['rate_p99'], '.2f')}"
        )
        rss = "-" if r["rss_idle"] is None else f"{r['rss_idle']:.0f} / {r['rss_after']:.0f}"
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['rps'] / m['rps']:.2f} | {r['rps'] / n['rps']:.2f} "
            f"| {_f(r['cpu_us'])} | {r['p50']:.2f} / {r['p99']:.2f} | {added} "
            f"| {r['mib_s']:,.0f} | {r['mib_s'] / d['mib_s']:.2f} | {rss} |"
        )
    lines += [
        "",
        "Connections (wrk -t1, small JSON): req/s and p99 (ms).",
        "",
        "| scenario | " + " | ".join(f"c{c}" for c in s.scaling) + " |",
        "|---|" + "---:|" * len(s.scaling),
    ]
    for name, r in summary.items():
        cells = []
        for c in s.scaling:
            rps, p99, errors = r["scaling"][c]
            cells.append(
                f"{rps:,.0f} req/s, p99 {p99:.1f}" + (f" ({errors} errors)" if errors else "")
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(summary: dict[str, dict[str, Any]], s: Settings) -> str:
    """RSS of each proxy: idle, under the most connections, and around the 1 MiB burst; TLS
    handshakes per 10,000 requests (keep-alive and session reuse to the origin)."""
    lines = [
        f"Memory (MiB, RSS of the proxy's processes) and TLS connections to the origin. "
        f"1 MiB burst: wrk -c{s.mib_connections} on 1 MiB answers; after = "
        f"{memory.INTERVAL + 2:g} s after it ended.",
        "",
        f"| scenario | idle | under c{max(s.scaling)} (peak) | before 1 MiB burst | peak in it "
        "| after it | TLS handshakes per 10,000 requests |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in summary.items():
        if r["rss_idle"] is None:
            continue
        shakes = _f(r["handshakes_10k"], ".1f") if name.endswith(TLS) else "-"
        lines.append(
            f"| {name} | {_f(r['rss_idle'])} | {_f(r['rss_conns'])} | {_f(r['rss_before_mib'])} "
            f"| {_f(r['rss_peak_mib'])} | {_f(r['rss_after_mib'])} | {shakes} |"
        )
    return "\n".join(lines)


def token_table(token: dict[str, Any], stream: dict[str, Any], restart: dict[str, Any]) -> str:
    c, w, r = token["cold"]["latency"], token["warm"]["latency"], token["refresh"]
    f = restart["burst"]["latency"]
    lines = [
        "| erp-broker only | result |",
        "|---|---|",
        f"| cold start, {token['cold']['count']} concurrent requests (the first token request "
        f"held until all were sent, then answered in {token['token_delay'] * 1e3:.0f} ms) | "
        f"{token['cold_token_requests']} token request ({token['token_seconds'] * 1e3:.0f} ms in "
        f"all, of which the burst waited {token['token_wait'] * 1e3:.0f} ms), "
        f"{token['waiters']:.0f} requests waited for it; statuses {token['cold']['statuses']} |",
        f"| burst latency p50 / p99 / max (ms): cold start; a fresh process holding a token "
        f"(same burst, connections to the origin also opened from scratch); warm | "
        f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f} / {c['max_ms']:.0f}; "
        f"{f['p50_ms']:.0f} / {f['p99_ms']:.0f} / {f['max_ms']:.0f}; "
        f"{w['p50_ms']:.0f} / {w['p99_ms']:.0f} / {w['max_ms']:.0f}. Added by the token wait (p99, "
        f"cold − fresh): {c['p99_ms'] - f['p99_ms']:.0f} ms for a {token['token_wait'] * 1e3:.0f} ms "
        "wait |",
        f"| refresh-ahead under {r['inside'].get('n', 0) + r['outside'].get('n', 0)} requests at a "
        f"fixed rate | {r['token_requests']} token request, {r['waiters']:.0f} waiters; p99 while "
        f"it ran {r['inside'].get('p99_ms', float('nan')):.2f} ms (n={r['inside']['n']}) vs "
        f"{r['outside'].get('p99_ms', float('nan')):.2f} ms otherwise; statuses {r['statuses']} |",
    ]
    for direction in ("download", "upload"):
        x = stream[direction]
        lines.append(
            f"| 1 GiB {direction} | {x['mib_s']:,.0f} MiB/s (direct download {stream['direct_mib_s']:,.0f} "
            f"MiB/s), status {x['status']}, {x['bytes'] / MIB:,.0f} MiB moved, peak RSS growth "
            f"{x['rss_peak_growth']:.1f} MiB over {x['rss_before']:.0f} MiB before |"
        )
    lines.append(
        f"| restart with a persisted valid token | ready in {restart['ready_s']:.2f} s (process "
        f"start to /readyz 200), {restart['token_requests']} token requests |"
    )
    return "\n".join(lines)


def targets_table(
    summary: dict[str, dict[str, Any]],
    token: dict[str, Any],
    stream: dict[str, Any],
    restart: dict[str, Any],
) -> tuple[str, list[tuple[str, bool]]]:
    b, m, d = summary["erp-broker"], summary["minimal"], summary["direct"]
    bt, mt, dt, nt = (
        summary[f"{name}{TLS}"] for name in ("erp-broker", "minimal", "direct", "nginx")
    )
    added_p99_tls = bt["rate_p99"] - dt["rate_p99"]
    added_p99 = b["rate_p99"] - d["rate_p99"]
    c = token["cold"]["latency"]
    # Against the same burst on a fresh process that has a token: both open their upstream
    # connections from scratch, so the difference is what waiting for the token cost.
    control = restart["burst"]["latency"]
    added_cold = c["p99_ms"] - control["p99_ms"]
    growth = max(stream["download"]["rss_peak_growth"], stream["upload"]["rss_peak_growth"])
    rows = [
        (
            "TLS to the ERP: small requests ≥ 1.5x minimal",
            f"{bt['rps'] / mt['rps']:.2f}x",
            bt["rps"] >= 1.5 * mt["rps"],
        ),
        (
            "TLS to the ERP: added p99 at ~1,000 req/s ≤ 1 ms",
            f"{added_p99_tls:.2f} ms",
            added_p99_tls <= 1.0,
        ),
        (
            "TLS to the ERP: 1 MiB ≥ 0.9x nginx",
            f"{bt['mib_s'] / nt['mib_s']:.2f}x",
            bt["mib_s"] >= 0.9 * nt["mib_s"],
        ),
        (
            "TLS to the ERP: handshakes per 10,000 requests ≤ the pool size (c50: 50)",
            f"{bt['handshakes_10k']:.1f}",
            bt["handshakes_10k"] <= 50,
        ),
        (
            "after the 1 MiB burst over TLS, RSS within 10 MiB of idle",
            f"{_f(bt['rss_after_mib'])} MiB after vs {_f(bt['rss_idle'])} idle "
            f"(peak {_f(bt['rss_peak_mib'])})",
            bt["rss_after_mib"] is not None and bt["rss_after_mib"] - bt["rss_idle"] <= 10,
        ),
        (
            "small requests, all features on: ≥ 1.0x minimal (aim 1.5x)",
            f"{b['rps'] / m['rps']:.2f}x",
            b["rps"] >= m["rps"],
        ),
        ("added p99 at ~1,000 req/s ≤ 1.5 ms", f"{added_p99:.2f} ms", added_p99 <= 1.5),
        (
            "1 MiB ≥ 0.65x direct",
            f"{b['mib_s'] / d['mib_s']:.2f}x",
            b["mib_s"] >= 0.65 * d["mib_s"],
        ),
        ("1 GiB streamed: RSS growth ≤ 16 MiB", f"{growth:.1f} MiB", growth <= 16),
        ("idle RSS ≤ 45 MiB", f"{b['rss_idle']:.0f} MiB", b["rss_idle"] <= 45),
        (
            "ready within 1 s with a persisted valid token",
            f"{restart['ready_s']:.2f} s",
            restart["ready_s"] <= 1.0 and restart["token_requests"] == 0,
        ),
        (
            "cold start, 1,000 concurrent: exactly one token request",
            str(token["cold_token_requests"]),
            token["cold_token_requests"] == 1,
        ),
        (
            "cold start: waiters' added latency (p99, vs a fresh process) ≤ token latency + 10 ms",
            f"{added_cold:.0f} ms vs {token['token_wait'] * 1e3:.0f} + 10 ms",
            added_cold <= token["token_wait"] * 1e3 + 10,
        ),
        (
            "refresh-ahead: no added latency, no waiters",
            f"{token['refresh']['waiters']:.0f} waiters, p99 {token['refresh']['inside'].get('p99_ms', float('nan')):.2f} ms "
            f"vs {token['refresh']['outside'].get('p99_ms', float('nan')):.2f} ms",
            token["refresh"]["waiters"] == 0 and token["refresh"]["token_requests"] == 1,
        ),
    ]
    lines = ["| target (issues 7 and 20) | measured | met |", "|---|---|---|"]
    lines += [
        f"| {what} | {value} | {'met' if ok else '**not met**'} |" for what, value, ok in rows
    ]
    return "\n".join(lines), [(what, ok) for what, _, ok in rows]


def update_results(section: str, body: str) -> None:
    """Replace the marked section of RESULTS.md (the hand-kept optimisation log stays)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# erp-broker benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def machine_block(info: dict[str, str], mode: str) -> str:
    return (
        f"Machine: {info['nproc']} cores, {info['cpu']}, kernel {info['kernel']}, Python "
        f"{info['python']}, {info['nginx']}, {info['wrk']}. Date {info['date']}, commit "
        f"`{info['commit']}`, mode: {mode}."
    )


# -- soak ------------------------------------------------------------------------------------


def soak(bench: Bench, seconds: float, rate: float) -> str:
    """Steady load with 5 s tokens and injected 401/429/504; the ERP is the simulator."""
    server = bench.start_token_server("token-server-soak", 5, 0.05)
    config, port, admin = bench.broker_config("broker-soak", server, base_url=server)
    proc = bench.start_broker("broker-soak", config, admin)
    url = f"http://127.0.0.1:{port}/origin/_test/echo"
    # Warm up, then take the starting memory.
    loadgen("rate", url, "--rate", str(rate), "--duration", "5")
    rss_start = proc.rss_mib()
    load = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(LOAD_CPU),
            sys.executable,
            "-m",
            "bench.loadgen",
            "rate",
            url,
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    injected: dict[str, int] = {"401": 0, "429": 0, "504": 0}
    kinds = [
        {"status": 401, "body": {"error": {"code": "ODP_UNAUTHORIZED"}}},
        {"status": 429, "headers": {"Retry-After": "1"}},
        {"status": 504},
    ]
    rss_trace: list[tuple[float, float]] = []
    started = time.monotonic()
    i = 0
    while load.poll() is None and time.monotonic() - started < seconds:
        time.sleep(3.0)
        if time.monotonic() - started < seconds - 5:
            spec = kinds[i % len(kinds)]
            http_post(server + "/_sandbox/queue", orjson.dumps({"target": "api", **spec}))
            injected[str(spec["status"])] += 1
            i += 1
        rss_trace.append((time.monotonic() - started, proc.rss_mib()))
    result = orjson.loads(load.communicate(timeout=120)[0])
    rss_end = proc.rss_mib()
    tokens = bench.token_requests(server)  # the whole life of the broker, warm-up included
    retries = bench.metric(admin, "erp_broker_retries_total")
    proc.stop()
    events = [
        orjson.loads(line) for line in proc.log.read_text().splitlines() if line.startswith("{")
    ]
    obtained = [e for e in events if e.get("event") == "token_obtained"]
    reasons: dict[str, int] = {}
    for e in obtained:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    # A second token request for the same expiry would show as a token obtained within a
    # second of the previous one, for another reason than an injected 401.
    stamps = [
        datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in obtained
    ]
    duplicates = sum(
        1
        for prev, cur, e in zip(stamps, stamps[1:], obtained[1:], strict=False)
        if (cur - prev).total_seconds() < 1.0 and e["reason"] != "rejected"
    )
    by_expiry = len(obtained) - reasons.get("rejected", 0)
    statuses = result["statuses"]
    bad = {k: v for k, v in statuses.items() if k != "200"}
    passthrough = {k: v for k, v in bad.items() if k in injected}
    errors = {k: v for k, v in bad.items() if k not in injected}
    lat = result["latency"]
    lines = [
        f"Soak: {seconds:g} s at {rate:g} req/s through erp-broker to the IFS simulator (tokens "
        f"live 5 s, refreshed 1 s ahead); injected every 3 s in turn: 401, 429 (Retry-After: 1), 504.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| requests | {lat['n']:,} (sent {result['achieved_rate']:.0f}/s), statuses {statuses}, "
        f"connection errors {result['errors']} | - |",
        f"| client-visible errors | {sum(errors.values()) + result['errors']} errors {errors or ''}; "
        f"passthroughs {passthrough or 0} | none but passthroughs |",
        f"| injected | {injected}; broker retries {retries:.0f} | every one absorbed |",
        f"| token requests | {len(tokens)} seen by the token endpoint, {len(obtained)} tokens obtained "
        f"by the broker in its {seconds + 5:g} s (warm-up included), by reason {reasons} "
        f"(rejected: after an injected 401; expired: a request found no valid token) | - |",
        f"| token requests per expiry | {by_expiry / max(1, by_expiry - duplicates):.2f} "
        f"({by_expiry} for expiries, {duplicates} duplicates, "
        f"{reasons.get('expired', 0)} requests waited on an expired token) | one |",
        f"| latency p50 / p99 / max | {lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['max_ms']:.0f} ms "
        f"(a 429 holds every request for its Retry-After) | - |",
        f"| broker RSS | {rss_start:.1f} MiB at start → {rss_end:.1f} MiB at end "
        f"(trace: {', '.join(f'{r:.1f}' for _, r in rss_trace[:: max(1, len(rss_trace) // 8)])}) | flat |",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="erp-broker-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs and configs kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def preflight() -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset", "curl") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (bench/run.sh installs them)")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit(
            "the benchmark needs 2 cores: the proxy on core 0, load and origin on core 1"
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    # This process (and what it starts without taskset) stays off the proxy's core.
    os.sched_setaffinity(0, {LOAD_CPU})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short run of each (≲ 2 min)")
    parser.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=180.0,
        metavar="SECONDS",
        help="soak mode instead (default 180 s)",
    )
    parser.add_argument("--soak-rate", type=float, default=200.0)
    parser.add_argument(
        "--only",
        choices=["side-by-side", "token", "stream"],
        action="append",
        help="run only these parts (profiling); RESULTS.md is then left alone",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.soak is not None and not 10 <= args.soak <= 1800:
        parser.error("--soak takes 10 to 1800 seconds")
    preflight()
    settings = Settings.quick_mode() if args.quick else Settings()
    info = machine()
    started = time.monotonic()
    with workdir(args.keep) as path:
        bench = Bench(settings, path)
        try:
            bench.start_origin()
            bench.start_sink()
            if args.soak is not None:
                text = soak(bench, args.soak, args.soak_rate)
                print(text)
                if not args.no_write:
                    update_results(
                        "soak",
                        "## Soak\n\n" + machine_block(info, f"soak {args.soak:g}s") + "\n\n" + text,
                    )
                return 0
            bench.token_url = bench.start_token_server("token-server", 3600)
            bench.token = bench.fetch_token(bench.token_url)
            parts = set(args.only or ["side-by-side", "token", "stream"])
            targets = bench.targets() + bench.targets(tls=True)
            broker = targets[3]
            if "side-by-side" in parts:
                print("side by side:", flush=True)
                bench.side_by_side(targets)
            stream = bench.streaming(broker) if "stream" in parts else None
            token = bench.token_path() if "token" in parts else None
            restart = bench.restart_ready(broker) if "token" in parts else None
        finally:
            bench.stop_all()
    if args.only:
        return 0
    summary = summarise(targets)
    mode = "quick" if settings.quick else "full"
    table = "\n\n".join(
        [tables(summary, settings), tables(summary, settings, TLS), memory_table(summary, settings)]
    )
    extra = token_table(token, stream, restart)
    goals, _ = targets_table(summary, token, stream, restart)
    elapsed = time.monotonic() - started
    report = "\n\n".join(
        [
            "## Latest run",
            machine_block(info, f"{mode}, {elapsed:.0f} s in all"),
            table,
            extra,
            goals,
        ]
    )
    print()
    print(report)
    if not args.no_write:
        update_results("results", report)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0
