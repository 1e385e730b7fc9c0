"""An upload sink for the streaming benchmark: reads any body to the end, answers its length.

python -m bench.sink --port 0      (prints its URL)
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web


async def sink(request: web.BaseRequest) -> web.Response:
    length = 0
    while chunk := await request.content.readany():
        length += len(chunk)
    return web.json_response({"length": length})


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(sink), client_max_size=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port", type=int, default=0)
    uvloop.run(serve(parser.parse_args().port))
