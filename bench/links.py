"""What rewriting links costs: one broker, two connectors to the same origin, rewrite_links on
and off, measured side by side (interleaved runs, medians).

    python -m bench.links [--seconds 5] [--rounds 3]

The origin (an aiohttp app on the load core) serves a token endpoint and two OData answers:
``/small`` (one entity, ~0.5 KiB, three links) and ``/1m`` (a 1 MiB collection page in full
metadata: ``@odata.id`` and ``@odata.editLink`` on every row, so about one link per 150 bytes,
and ``@odata.nextLink``). wrk drives ``/on/...`` and ``/off/...`` of the same broker; the
broker's CPU per request comes from ``/proc``. It also times the rewriter alone, in this
process, on the same 1 MiB body. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from .procs import LOAD_CPU, SUT_CPU, Proc, free_port, http_get, wait_port
from .runner import median, wrk

MIB = 1024 * 1024
SERVICE = "/main/ifsapplications/projection/v1/CustomerHandling.svc"


def entity(base: str, n: int) -> dict[str, Any]:
    key = f"CustomerInfoSet(CustomerId='C{n:06d}')"
    return {
        "@odata.id": f"{base}{SERVICE}/{key}",
        "@odata.editLink": f"{base}{SERVICE}/{key}",
        "@odata.etag": f'W/"{n:020d}"',
        "CustomerId": f"C{n:06d}",
        "Name": f"Customer number {n}",
        "Country": "SE",
        "CreationDate": "2021-06-30",
        "Objstate": "Active",
    }


def small_body(base: str) -> bytes:
    return orjson.dumps(
        {"@odata.context": f"{base}{SERVICE}/$metadata#CustomerInfoSet/$entity"} | entity(base, 7)
    )


def page_body(base: str, size: int = MIB) -> bytes:
    rows = []
    total = 0
    while total < size - 400:
        row = entity(base, len(rows))
        rows.append(row)
        total += len(orjson.dumps(row)) + 1
    return orjson.dumps(
        {
            "@odata.context": f"{base}{SERVICE}/$metadata#CustomerInfoSet",
            "value": rows,
            "@odata.nextLink": f"{base}{SERVICE}/CustomerInfoSet?$skiptoken={len(rows)}",
        }
    )


def origin(port: int) -> None:
    from aiohttp import web

    base = f"http://127.0.0.1:{port}"
    small, page = small_body(base), page_body(base)
    token = orjson.dumps(
        {"access_token": "bench-token", "expires_in": 3600, "token_type": "Bearer"}
    )
    kind = "application/json;odata.metadata=full"

    async def token_route(request: web.Request) -> web.Response:
        return web.Response(body=token, content_type="application/json")

    async def small_route(request: web.Request) -> web.Response:
        return web.Response(body=small, headers={"Content-Type": kind})

    async def page_route(request: web.Request) -> web.Response:
        return web.Response(body=page, headers={"Content-Type": kind})

    app = web.Application()
    app.router.add_post("/token", token_route)
    app.router.add_get("/small", small_route)
    app.router.add_get("/1m", page_route)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def rewriter_alone(rounds: int = 5) -> float:
    """MiB/s of :class:`broker.links.JsonLinks` on the 1 MiB page fed in 64 KiB pieces."""
    from broker.links import LinkRewriter

    base = "https://ifs.example.com"
    body = page_body(base)
    links = LinkRewriter(base, "/ifs/", bodies=True)
    times = []
    for _ in range(rounds):
        rewrite = links.answer(
            "127.0.0.1:8080", [("Content-Type", "application/json")], has_body=True
        )
        assert rewrite is not None
        started = time.perf_counter()
        out = 0
        for i in range(0, len(body), 65536):
            out += sum(len(p) for p in rewrite.feed(body[i : i + 65536]))
        out += len(rewrite.end())
        times.append(time.perf_counter() - started)
        assert out > len(body)
    return len(body) / MIB / median(times)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.links")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--origin", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.origin:
        origin(args.origin)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        work = Path(tmp)
        origin_port, port, admin = free_port(), free_port(), free_port()
        procs = [
            Proc(
                "origin",
                [sys.executable, "-m", "bench.links", "--origin", str(origin_port)],
                LOAD_CPU,
                work / "origin.log",
            )
        ]
        try:
            wait_port(origin_port)
            upstream = f"http://127.0.0.1:{origin_port}"
            connector = {
                "type": "ifs_apps10",
                "base_url": upstream,
                "token_url": f"{upstream}/token",
                "client_id": "c",
                "client_secret": "s",
                "username": "u",
                "password": "p",
            }
            config = {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "store": {"sqlite": str(work / "t.db")},
                "log_format": "json",
                "connectors": {
                    "on": {**connector, "rewrite_links": True},
                    "off": {**connector, "rewrite_links": False},
                },
            }
            (work / "broker.yaml").write_text(yaml.safe_dump(config))
            broker = Proc(
                "broker",
                [sys.executable, "-m", "broker", "run", "-c", str(work / "broker.yaml")],
                SUT_CPU,
                work / "broker.log",
            )
            procs.append(broker)
            wait_port(port)
            proxy = f"http://127.0.0.1:{port}"
            for mode in ("on", "off"):
                status, body = http_get(f"{proxy}/{mode}/small")
                assert status == 200, body
                assert (upstream.encode() in body) is (mode == "off"), body
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for path, connections in (("small", 20), ("1m", 4)):
                    for mode in ("on", "off"):
                        cpu = broker.cpu_seconds()
                        run = wrk(f"{proxy}/{mode}/{path}", connections, args.seconds)
                        used = broker.cpu_seconds() - cpu
                        per = used / max(1, run["requests"]) * 1e6
                        results.setdefault((path, mode), []).append((run["rps"], per))
            alone = rewriter_alone()
        finally:
            for proc in reversed(procs):
                proc.stop()
    sizes = {"small": len(small_body(upstream)) / 1024, "1m": len(page_body(upstream)) / MIB}
    print("| answer | rewrite_links | req/s | MiB/s | broker CPU µs/req |")
    print("|---|---|---:|---:|---:|")
    for path in ("small", "1m"):
        for mode in ("off", "on"):
            rps = median([r for r, _ in results[path, mode]])
            cpu = median([c for _, c in results[path, mode]])
            mib = rps * (sizes["1m"] if path == "1m" else sizes["small"] / 1024)
            label = f"{sizes['small']:.2f} KiB entity" if path == "small" else "1 MiB page"
            print(f"| {label} | {mode} | {rps:,.0f} | {mib:,.1f} | {cpu:,.0f} |")
    print(f"\nThe rewriter alone on the 1 MiB page (64 KiB pieces): {alone:,.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
