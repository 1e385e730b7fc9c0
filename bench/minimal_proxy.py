"""The Python reference: the reverse proxy anyone would write with aiohttp + uvloop.

One ClientSession, the body streamed both ways, one header injected, hop-by-hop headers
dropped. No routing, metrics, logs, retries or token handling: what erp-broker must beat.

    python -m bench.minimal_proxy --port 8081 --upstream http://127.0.0.1:8000 --auth 'Bearer x'

With ``--ca-file`` it verifies an HTTPS upstream against that CA (aiohttp reuses TLS sessions
and keeps connections alive on its own).
"""

import argparse
import asyncio
import ssl

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


async def serve(port: int, upstream: str, auth: str, ca_file: str | None = None) -> None:
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256, ssl=context if context else True),
        auto_decompress=False,
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = auth
        data = request.content if request.body_exists else None
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as up:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            for key, value in up.headers.items():
                if key.lower() not in HOP_BY_HOP or key.lower() == "content-length":
                    response.headers.add(key, value)
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"minimal proxy on 127.0.0.1:{port} -> {upstream}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--auth", required=True)
    parser.add_argument("--ca-file")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream.rstrip("/"), args.auth, args.ca_file))
