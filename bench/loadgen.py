"""A small open-loop HTTP/1.1 load generator for what wrk cannot do: a fixed rate, and bursts.

wrk measures throughput at saturation (closed loop). Added latency at a moderate load needs an
open loop: requests leave on a fixed schedule whatever the answers do, so a slow proxy shows up
as latency rather than as a lower request rate. Debian has no wrk2, so this is the stand-in:
raw asyncio protocols (no HTTP client library on the measuring side), keep-alive connections
opened up front, one latency sample per request from the moment its bytes are written to the
moment its last byte arrives. Everything is bounded by ``--duration`` / ``--count``.

Modes (JSON on stdout)::

    python -m bench.loadgen rate  URL --rate 1000 --duration 10
    python -m bench.loadgen burst URL --count 1000 [--wait-port]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, float, int]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, float, int]]:
        """Write ``data``; the future gives (status, end time, body length)."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        parsed = _complete(self._buf)
        if parsed is not None and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((parsed[0], time.perf_counter(), parsed[1]))


def _complete(buf: bytearray) -> tuple[int, int] | None:
    """(status, body length) once ``buf`` holds a whole response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length: int | None = None
    chunked = False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    body = end + 4
    if chunked:
        pos, size = body, 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            n = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if n == 0:
                return (status, size) if buf.find(b"\r\n", eol + 2) >= 0 else None
            if len(buf) < eol + 2 + n + 2:
                return None
            size += n
            pos = eol + 2 + n + 2
    length = length or 0
    return (status, length) if len(buf) >= body + length else None


#: TLS to the target (an ``https`` URL, verified against ``--ca-file``); None for plain HTTP.
_TLS: ssl.SSLContext | None = None


def _open(loop: asyncio.AbstractEventLoop, host: str, port: int) -> Any:
    """One new connection, over TLS when the URL says https."""
    if _TLS is None:
        return loop.create_connection(_Conn, host, port)
    return loop.create_connection(_Conn, host, port, ssl=_TLS, server_hostname=host)


def _request_bytes(url: str, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    default = 443 if parts.scheme == "https" else 80
    host, port = parts.hostname or "127.0.0.1", parts.port or default
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", *headers, "", ""]
    return host, port, "\r\n".join(lines).encode("latin-1")


async def _connect(host: str, port: int, n: int, *, batch: int = 100) -> list[_Conn]:
    """Open ``n`` connections, ``batch`` at a time (a listen backlog is not infinite)."""
    loop = asyncio.get_running_loop()
    conns: list[_Conn] = []
    while len(conns) < n:
        step = min(batch, n - len(conns))
        made = await asyncio.gather(*(_open(loop, host, port) for _ in range(step)))
        conns.extend(protocol for _, protocol in made)
    return conns


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    s = sorted(samples)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    return {
        "n": len(s),
        "p50_ms": at(0.50) * 1e3,
        "p90_ms": at(0.90) * 1e3,
        "p99_ms": at(0.99) * 1e3,
        "max_ms": s[-1] * 1e3,
        "mean_ms": sum(s) / len(s) * 1e3,
    }


async def run_rate(url: str, rate: float, duration: float, headers: list[str], conns: int) -> dict:
    """Send ``rate`` requests per second for ``duration`` seconds on a fixed schedule."""
    host, port, data = _request_bytes(url, headers)
    idle = await _connect(host, port, conns)
    pool = list(idle)
    total = int(rate * duration)
    latencies: list[float] = []
    sends: list[tuple[float, float, int]] = []  # (monotonic send time, latency, status)
    lags: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    pending: set[asyncio.Task[None]] = set()
    free = asyncio.Queue[_Conn]()
    for conn in idle:
        free.put_nowait(conn)

    async def one(conn: _Conn) -> None:
        nonlocal errors
        sent = time.perf_counter()
        mono = time.monotonic()
        try:
            status, done, _ = await conn.request(data)
        except ConnectionError:
            errors += 1
            return
        latency = done - sent
        latencies.append(latency)
        sends.append((mono, latency, status))
        statuses[status] = statuses.get(status, 0) + 1
        if not conn.closed:
            free.put_nowait(conn)

    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if free.empty() and len(pool) < 4 * conns:
            _, extra = await _open(loop, host, port)
            pool.append(extra)
            free.put_nowait(extra)
        conn = await free.get()
        lags.append(time.perf_counter() - due)
        task = asyncio.create_task(one(conn))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    elapsed = time.perf_counter() - start
    for conn in pool:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "mode": "rate",
        "rate": rate,
        "achieved_rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency": _percentiles(latencies),
        "send_lag": _percentiles(lags),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
        "samples": sends if _WANT_SAMPLES else [],
    }


async def run_burst(
    url: str, count: int, headers: list[str], wait_port: float, then_post: str | None = None
) -> dict:
    """Open ``count`` connections, then send one request on each at the same moment."""
    host, port, data = _request_bytes(url, headers)
    deadline = time.monotonic() + wait_port
    while True:
        try:
            probe = socket.create_connection((host, port), timeout=0.2)
            probe.close()
            break
        except OSError:
            if time.monotonic() > deadline:
                return {"mode": "burst", "error": f"{host}:{port} never accepted"}
            await asyncio.sleep(0.002)
    connected = time.monotonic()
    conns = await _connect(host, port, count)
    opened = time.monotonic()
    sent = time.perf_counter()
    sent_mono = time.monotonic()
    answers = [c.request(data) for c in conns]
    if then_post:  # e.g. open the token endpoint's gate once every request is on its way
        await asyncio.sleep(0.05)
        post_host, post_port, _ = _request_bytes(then_post, [])
        target = urlsplit(then_post).path
        _, writer = await asyncio.open_connection(post_host, post_port)
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: {post_host}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
    results = await asyncio.gather(*answers, return_exceptions=True)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    for result in results:
        if isinstance(result, BaseException):
            errors += 1
            continue
        status, done, _ = result
        latencies.append(done - sent)
        statuses[status] = statuses.get(status, 0) + 1
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "mode": "burst",
        "count": count,
        "port_open_at": connected,
        "connect_s": opened - connected,
        "sent_at": sent_mono,
        "latency": _percentiles(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": errors,
    }


_WANT_SAMPLES = False


def main(argv: list[str] | None = None) -> int:
    global _WANT_SAMPLES, _TLS
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=["rate", "burst"])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--wait-port", type=float, default=0.0, help="seconds to wait for it")
    parser.add_argument("--samples", action="store_true", help="include per-request samples")
    parser.add_argument("--then-post", help="burst: POST to this URL once every request is sent")
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("--ca-file", help="https URLs: the CA that signed the target's certificate")
    args = parser.parse_args(argv)
    _WANT_SAMPLES = args.samples
    if args.url.startswith("https:"):
        _TLS = ssl.create_default_context(cafile=args.ca_file)
    if args.duration > 600 or args.count > 20000:
        parser.error("bounded: --duration at most 600 s, --count at most 20000")
    if args.mode == "rate":
        coro = run_rate(args.url, args.rate, args.duration, args.header, args.connections)
    else:
        coro = run_burst(args.url, args.count, args.header, args.wait_port, args.then_post)
    result = asyncio.run(coro)
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
