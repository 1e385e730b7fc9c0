"""The benchmark's identity provider: an IFS Apps 10 simulator (Keycloak) in its own process.

The broker's connector takes its tokens from here (``token_url``); in soak mode its API calls
come here too, so that 401/429/504 queued with ``POST /_sandbox/queue`` reach the broker.
``GET /_bench/token-times`` lists when each token request arrived (``time.monotonic``, which is
system-wide on Linux, so the load generator's clock can be compared with it). With
``--gate-closed`` token requests wait until ``POST /_bench/open-gate`` (then the usual
``--token-delay``): a cold start can be hit by a burst however long its connections take.

    python -m bench.token_server --port 0 --token-lifetime 3600 --token-delay 0.1
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import uvloop
from aiohttp import web

from broker.sandbox import IfsApps10Sim
from broker.sandbox.base import json_response


class BenchIfsSim(IfsApps10Sim):
    """IfsApps10Sim plus a read-out of token request times and a gate in front of the token
    endpoint; API records are not kept (a soak sends hundreds of thousands of requests)."""

    def __init__(self, *, gate_closed: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token_gate = asyncio.Event()
        if not gate_closed:
            self.token_gate.set()

    def _build_app(self) -> web.Application:
        app = super()._build_app()
        app.router.add_get("/_bench/token-times", self._token_times)
        app.router.add_post("/_bench/open-gate", self._open_gate)
        return app

    def token_route(self, handler: Any, grant: str | None = None) -> Any:
        wrapped = super().token_route(handler, grant)

        async def gated(request: web.Request) -> web.StreamResponse:
            await self.token_gate.wait()
            return await wrapped(request)

        return gated

    async def _open_gate(self, request: web.Request) -> web.Response:
        self.token_gate.set()
        return json_response({"open": True})

    async def _record(self, record: object) -> None:  # type: ignore[override]
        if type(record).__name__ == "ApiRecord":
            self.api_count = getattr(self, "api_count", 0) + 1
            return
        await super()._record(record)  # type: ignore[arg-type]

    async def _token_times(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "token_requests": [
                    {"arrived": r.time, "grant": r.grant, "status": r.status}
                    for r in self.token_requests
                ],
                "api_requests": getattr(self, "api_count", 0),
            }
        )


async def serve(port: int, lifetime: int, delay: float, gate_closed: bool) -> None:
    sim = BenchIfsSim(
        token_lifetime=lifetime, refresh_lifetime=max(3600, 2 * lifetime), gate_closed=gate_closed
    )
    sim.token_delay = delay
    url = await sim.start("127.0.0.1", port)
    print(url, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.token_server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-lifetime", type=int, default=3600)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--gate-closed", action="store_true")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.token_lifetime, args.token_delay, args.gate_closed))
