"""The broker's two listeners around a :class:`~broker.runtime.Broker`, and their lifecycle.

Resources are set up in dependency order (store → connectors → proxy listener → admin
listener) and torn down in reverse by :meth:`BrokerServer.stop`; a SIGTERM drains the proxy
listener first, so in-flight requests finish while readiness already reports "draining".
"""

from __future__ import annotations

import asyncio
import gc

import structlog
from aiohttp import web

from .answers import refusal_answer
from .config import Config
from .errors import BrokerError
from .memory import give_back_memory
from .ports import reserve
from .runtime import Broker
from .server import Server, Timeouts

log = structlog.get_logger("broker.app")


class BrokerServer:
    """Both listeners around a :class:`Broker`; ports may be 0 (tests) and are read back."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._proxy_server: Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port = 0

    @property
    def proxy_url(self) -> str:
        host = self.broker.config.listen_address[0]
        return f"http://{_url_host(host)}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        host = self.broker.config.admin_address[0]
        return f"http://{_url_host(host)}:{self.admin_port}"

    async def start(self) -> None:
        config = self.broker.config
        # Both addresses are held before any login, so that a port clash fails at once.
        held = [reserve(*config.listen_address, "listen")]
        try:
            held.append(reserve(*config.admin_address, "admin_listen"))
            await self._start()
        finally:
            for sock in held:
                if sock is not None:
                    sock.close()

    async def _start(self) -> None:
        from .admin import admin_app

        broker = self.broker
        await broker.start()
        assert broker.proxy is not None
        config = broker.config
        try:
            timeouts = config.client_timeouts
            self._proxy_server = Server(
                broker.proxy.handle,
                refusal=refusal_answer,
                timeouts=Timeouts(timeouts.header, timeouts.body, timeouts.write),
            )
            host, port = config.listen_address
            try:
                self.proxy_port = await self._proxy_server.listen(host, port)
            except OSError as exc:
                message = f"listen: cannot listen on {host}:{port}: {exc.strerror}"
                raise BrokerError(message) from None
            self._admin_runner = web.AppRunner(
                admin_app(self), access_log=None, handle_signals=False, shutdown_timeout=2.0
            )
            await self._admin_runner.setup()
            self.admin_port = await _listen(
                self._admin_runner, *config.admin_address, "admin_listen"
            )
        except BaseException:
            await self.stop(revoke=False)
            raise
        log.info(
            "broker_started",
            listen=self.proxy_url,
            admin_listen=self.admin_url,
            connectors=sorted(broker.connectors),
        )

    async def stop(self, *, revoke: bool = True) -> None:
        """Drain: readiness fails, no new connections, in-flight requests finish (grace)."""
        broker = self.broker
        broker.draining = True
        if self._proxy_server is not None:
            log.info("draining", inflight=broker.proxy.inflight if broker.proxy else 0)
            await self._proxy_server.shutdown(broker.config.grace_period)
            self._proxy_server = None
        await broker.close(revoke=revoke)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        log.info("broker_stopped")


def listen_url(host: str, port: int) -> str:
    """The proxy's URL for a listen address, as an app on this host reaches it."""
    return f"http://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def _listen(runner: web.BaseRunner, host: str, port: int, key: str) -> int:
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise BrokerError(f"{key}: cannot listen on {host}:{port}: {exc.strerror}") from None
    # The runner serves this one site: its first address is the bound one (port 0 resolved).
    addresses = runner.addresses
    return int(addresses[0][1]) if addresses else port


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Make garbage collection cheap for a long-running proxy (bench/RESULTS.md).

    Everything allocated while starting (modules, config, pydantic models) lives as long as
    the process: ``gc.freeze()`` takes it out of every later collection. Proxying leaves no
    cyclic garbage (measured: none per request), so young-generation passes find nothing and
    can be rare; memory is freed by reference counting as before. Process-wide, so only for
    ``erp-broker run``.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 50, 100)


async def run_until_stopped(config: Config, stop: asyncio.Event) -> None:
    """``erp-broker run``: serve until ``stop`` is set (SIGTERM/SIGINT, /quitquitquit)."""
    tune_gc()  # before listening: the one full collection delays no request
    server = BrokerServer(Broker(config))
    await server.start()
    waiter = asyncio.ensure_future(stop.wait())
    quit_ = asyncio.ensure_future(server.broker.shutdown_requested.wait())
    proxy = server.broker.proxy
    trimmer = asyncio.ensure_future(give_back_memory(lambda: proxy is None or proxy.inflight == 0))
    try:
        await asyncio.wait({waiter, quit_}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        quit_.cancel()
        trimmer.cancel()
        log.info("shutdown", grace_period=config.grace_period)
        await server.stop(revoke=True)
