"""Idle footprint of `erp-broker run` with three connectors (issue 20), as a real process.

The three simulators (`broker/sandbox/`) run in this process, on a thread of their own; the
broker is `python -m broker run -c <file>` with a SQLite store, no encryption_key, no Redis,
no tracing. After /readyz answers 200 and a settle, VmRSS (and smaps_rollup's split) is read;
with ``--connections N``, N keep-alive client connections are opened to the proxy listener
(each sends one request and reads its answer, then stays open and idle) and RSS is read again.
With ``--tls`` the simulators serve HTTPS with a throwaway CA, added to a copy of the system
CA bundle that the broker gets as ``SSL_CERT_FILE``: the connectors have no ``ca_file``, as
against an ERP with a public certificate. Prints one JSON object. Bounded in time: every wait
has a deadline.

The broker runs from bytecode, as in the image (pip compiles every module of the wheel it
installs): a copy of `broker/` is compiled once, and the broker processes import it. An editable install under ``PYTHONDONTWRITEBYTECODE`` would compile
each module from source at every start instead, and keep ~1 MiB more (``--source`` measures
that).

    python -m bench.footprint [--repeat 3] [--settle 3] [--connections 1000] [--tls] [--source]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.procs import free_port, http_get
from broker.demo import demo_data
from broker.sandbox import Sandboxes, start_all

DEADLINE = 60.0  # seconds for one broker to become ready
PATH = "/ifs/main/ifsapplications/projection/v1/AllProjections.svc/Projections"


class SimThread:
    """The three simulators on an event loop of their own (not counted in the broker's RSS)."""

    def __init__(self, workdir: Path, tls: bool = False) -> None:
        self.env: dict[str, str] = {}
        context = None
        if tls:
            import trustme

            ca = trustme.CA()
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
            bundle = workdir / "ca-bundle.pem"
            system = Path(
                ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
            )
            bundle.write_bytes(system.read_bytes() + b"\n" + ca.cert_pem.bytes())
            self.env["SSL_CERT_FILE"] = str(bundle)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sandboxes: Sandboxes = self._call(start_all(ssl_context=context))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._call(self.sandboxes.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def reading(pid: int) -> dict[str, float]:
    kib = status_kib(pid)
    return {
        "rss_mib": mib(kib["VmRSS"]),
        "anon_mib": mib(kib["RssAnon"]),
        "file_mib": mib(kib["RssFile"]),
        "peak_mib": mib(kib["VmHWM"]),
    }


def open_idle(port: int, count: int, timeout: float) -> list[socket.socket]:
    """``count`` keep-alive connections, each having had one answer; held open by the caller."""
    request = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n").encode()
    deadline = time.monotonic() + timeout
    held: list[socket.socket] = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(sock)
        sock.sendall(request)
        _read_answer(sock)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(held)} connections opened in {timeout} s")
    return held


def _read_answer(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        body += chunk


def bytecode_env(workdir: Path) -> dict[str, str]:
    """The environment of a broker that runs from bytecode: a copy of `broker/` compiled in
    ``workdir`` (as the image's wheel install compiles it), first on the path."""
    source = workdir / "src"
    shutil.copytree(Path(__file__).resolve().parents[1] / "broker", source / "broker")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(source)],
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        check=True,
        timeout=120,
    )
    path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def one_run(
    sims: SimThread, settle: float, connections: int, env: dict[str, str]
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        workdir = Path(tmp)
        port, admin = free_port(), free_port()
        data = demo_data(sims.sandboxes, f"127.0.0.1:{port}", f"127.0.0.1:{admin}", workdir)
        config = workdir / "broker.yaml"
        config.write_text(yaml.safe_dump(data))
        log = (workdir / "broker.log").open("wb")
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "-c", str(config), "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**env, **sims.env},
        )
        held: list[socket.socket] = []
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError((workdir / "broker.log").read_text()[-2000:])
                try:
                    if http_get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() - started > DEADLINE:
                    raise TimeoutError("broker not ready")
                time.sleep(0.05)
            ready_s = time.monotonic() - started
            time.sleep(settle)
            result: dict[str, Any] = {"ready_s": round(ready_s, 2), "idle": reading(proc.pid)}
            if connections:
                opened = time.monotonic()
                held = open_idle(port, connections, timeout=120)
                time.sleep(settle)
                result["connections"] = connections
                result["open_s"] = round(time.monotonic() - opened, 2)
                result["with_connections"] = reading(proc.pid)
            return result
        finally:
            for sock in held:
                sock.close()
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="broker processes, one by one")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS")
    parser.add_argument("--connections", type=int, default=0, help="idle client connections")
    parser.add_argument("--tls", action="store_true", help="HTTPS simulators, system CA path")
    parser.add_argument("--source", action="store_true", help="no bytecode: compile each start")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="footprint-sims-") as tmp:
        env = dict(os.environ) if args.source else bytecode_env(Path(tmp))
        sims = SimThread(Path(tmp), args.tls)
        try:
            runs = [one_run(sims, args.settle, args.connections, env) for _ in range(args.repeat)]
        finally:
            sims.stop()
    summary: dict[str, Any] = {
        "commit": _commit(),
        "tls": args.tls,
        "bytecode": not args.source,
        "runs": runs,
        "idle_rss_mib_median": statistics.median(r["idle"]["rss_mib"] for r in runs),
    }
    if args.connections:
        summary["connections_rss_mib_median"] = statistics.median(
            r["with_connections"]["rss_mib"] for r in runs
        )
    print(json.dumps(summary, indent=2))
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(__file__),
        )
        return out.stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
