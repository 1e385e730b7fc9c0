"""Load with stalled clients: normal traffic's latency and the broker's memory while 300 clients
misbehave (issue 12).

A broker (pinned to core 0) in front of the benchmark's nginx origin; first normal traffic alone
(GET /small at a fixed rate), then the same traffic while these are held open:

- ``slow_head``: a request head that gains one byte every 2 s (slowloris);
- ``stalled_body``: a POST announcing 1,000,000 bytes that sends 1,000 and stops;
- ``non_reading``: 50 pipelined GETs of /1m (1 MiB answers) and not one byte read.

Reported, not asserted: p50/p99 of the normal requests in each phase, their statuses, the
broker's RSS before, at the end of the stalled phase and its peak, and how many stalled
connections the broker had closed by the end (its ``client_timeouts`` are the defaults, 60 s,
unless ``--timeout`` is given). Bounded: every phase lasts ``--duration`` seconds, and every
stalled connection is closed at the end.

    python -m bench.stalled --stalled 300 --duration 15 --rate 300 [--timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import sys
import time
from typing import Any

import yaml

from .loadgen import run_rate
from .runner import Bench, Settings, workdir

KINDS = ("slow_head", "stalled_body", "non_reading")
#: ``tcpi_state`` of a connection neither side has closed (linux/tcp_states.h).
TCP_ESTABLISHED = 1


class Stalled:
    """One misbehaving client; ``closed_by_peer`` once the broker has closed it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed_by_peer = False

    async def run(self, port: int, stop: asyncio.Event) -> None:
        try:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
            if self.kind == "slow_head":
                self.writer.write(b"GET /origin/small HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 2.0)
                    self.writer.write(b"a")
                    await self.writer.drain()
            elif self.kind == "stalled_body":
                self.writer.write(
                    b"POST /origin/small HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
                    + b"b" * 1000
                )
                await self.writer.drain()
                await stop.wait()
            else:
                transport = self.writer.transport
                transport.pause_reading()  # read nothing, ever
                self.writer.write(b"GET /origin/1m HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
                await stop.wait()
        except (ConnectionError, OSError):
            self.closed_by_peer = True
        finally:
            if self.writer is not None:
                self.closed_by_peer = self.closed_by_peer or self.writer.transport.is_closing()
                self.writer.transport.abort()


def closed_by_broker(client: Stalled) -> bool:
    """Whether the broker has closed this client's connection (a FIN or a reset came), read
    from the socket's TCP state without reading what waits in it."""
    if client.writer is None or client.writer.transport.is_closing():
        return True
    sock = client.writer.get_extra_info("socket")
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return bool(state != TCP_ESTABLISHED)


async def phase(
    port: int, rate: float, duration: float, stalled: int, kinds: tuple[str, ...] = KINDS
) -> dict[str, Any]:
    stop = asyncio.Event()
    clients = [Stalled(kinds[n % len(kinds)]) for n in range(stalled)]
    tasks = [asyncio.create_task(c.run(port, stop)) for c in clients]
    await asyncio.sleep(1.0 if stalled else 0)  # let them connect and stall
    result = await run_rate(f"http://127.0.0.1:{port}/origin/small", rate, duration, [], 8)
    gone = [closed_by_broker(c) for c in clients]
    stop.set()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    closed = {kind: 0 for kind in KINDS}
    for client, was_closed in zip(clients, gone, strict=True):
        closed[client.kind] += was_closed or client.closed_by_peer
    result["stalled_closed_by_broker"] = closed if stalled else {}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stalled", description=__doc__)
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, help="client_timeouts for the broker (s)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which stalled clients")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if not 0 < args.duration <= 120 or not 0 <= args.stalled <= 2000 or set(kinds) - set(KINDS):
        parser.error(f"--duration in (0, 120], --stalled in [0, 2000], --kinds of {KINDS}")
    missing = [tool for tool in ("nginx", "taskset") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")
    with workdir(args.keep) as path:
        bench = Bench(Settings.quick_mode(), path)
        try:
            bench.start_origin()
            bench.token_url = bench.start_token_server("token", 3600)
            config, port, admin = bench.broker_config("broker", bench.token_url)
            if args.timeout:
                data = yaml.safe_load(config.read_text())
                t = args.timeout
                data["client_timeouts"] = {"header": t, "body": t, "write": t}
                config.write_text(yaml.safe_dump(data, sort_keys=False))
            proc = bench.start_broker("broker", config, admin)
            report: dict[str, Any] = {"rss_idle_mib": round(proc.rss_mib(), 1)}
            started = time.monotonic()
            report["normal_alone"] = asyncio.run(phase(port, args.rate, args.duration, 0))
            proc.reset_peak()
            report["rss_before_mib"] = round(proc.rss_mib(), 1)
            report["with_stalled"] = asyncio.run(
                phase(port, args.rate, args.duration, args.stalled, kinds)
            )
            report["rss_after_mib"] = round(proc.rss_mib(), 1)
            report["rss_peak_mib"] = round(proc.peak_mib(), 1)
            report["seconds"] = round(time.monotonic() - started, 1)
        finally:
            bench.stop_all()
    print(render(report, args))
    return 0


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for name in ("normal_alone", "with_stalled"):
        r = report[name]
        lat = r["latency"]
        rows.append(
            f"| {name.replace('_', ' ')} | {r['achieved_rate']:.0f} | {lat.get('p50_ms', 0):.2f} "
            f"| {lat.get('p99_ms', 0):.2f} | {lat.get('max_ms', 0):.1f} | {r['statuses']} "
            f"| {r['errors']} |"
        )
    closed = report["with_stalled"]["stalled_closed_by_broker"]
    timeouts = f"{args.timeout:g} s" if args.timeout else "defaults (60 s)"
    return "\n".join(
        [
            f"{args.stalled} stalled clients ({args.kinds}), {args.rate:g} req/s of GET /small for "
            f"{args.duration:g} s per phase, client_timeouts {timeouts}",
            "",
            "| phase | req/s | p50 ms | p99 ms | max ms | statuses | errors |",
            "|---|---:|---:|---:|---:|---|---:|",
            *rows,
            "",
            f"broker RSS: idle {report['rss_idle_mib']} MiB, before the stalled phase "
            f"{report['rss_before_mib']} MiB, after it {report['rss_after_mib']} MiB, peak "
            f"{report['rss_peak_mib']} MiB; stalled connections the broker closed: {closed}; "
            f"run {report['seconds']} s",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
