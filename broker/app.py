"""The broker's two listeners around a :class:`~broker.runtime.Broker`, and their lifecycle.

Both listeners are :class:`~broker.server.Server` instances: the proxy's handler on
``listen``, the admin API's (:class:`~broker.admin.Admin`) on ``admin_listen``. Resources are
set up in dependency order (store → connectors → proxy listener → admin listener) and torn
down in reverse by :meth:`BrokerServer.stop`; a SIGTERM drains the proxy listener first, so
in-flight requests finish while readiness (on the admin listener, still up) already reports
"draining".
"""

from __future__ import annotations

import asyncio
import gc

import structlog

from .admin import Admin, refusal
from .answers import refusal_answer
from .config import Config
from .errors import BrokerError
from .memory import give_back_memory
from .ports import reserve
from .runtime import Broker
from .server import Handler, RefusalAnswer, Server, Timeouts

log = structlog.get_logger("broker.app")

#: At shutdown, how long admin requests in flight (a scrape, a refresh) get to finish.
ADMIN_GRACE = 2.0


class BrokerServer:
    """Both listeners around a :class:`Broker`; ports may be 0 (tests) and are read back."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._proxy_server: Server | None = None
        self._admin_server: Server | None = None
        self._admin: Admin | None = None
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
        broker = self.broker
        await broker.start()
        assert broker.proxy is not None
        config = broker.config
        try:
            self._proxy_server, self.proxy_port = await _listen(
                broker.proxy.handle, refusal_answer, config, *config.listen_address, "listen"
            )
            self._admin = Admin(self)
            await self._admin.start()
            self._admin_server, self.admin_port = await _listen(
                self._admin.handle, refusal, config, *config.admin_address, "admin_listen"
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
        if self._admin_server is not None:
            await self._admin_server.shutdown(ADMIN_GRACE)
            self._admin_server = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        log.info("broker_stopped")


def listen_url(host: str, port: int) -> str:
    """The proxy's URL for a listen address, as an app on this host reaches it."""
    return f"http://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def _listen(
    handler: Handler, refusal: RefusalAnswer, config: Config, host: str, port: int, key: str
) -> tuple[Server, int]:
    """A listener serving ``handler`` on ``host:port`` (the config's ``key``); its bound port."""
    timeouts = config.client_timeouts
    server = Server(
        handler,
        refusal=refusal,
        timeouts=Timeouts(
            timeouts.header, timeouts.body, timeouts.write, timeouts.keepalive, timeouts.lingering
        ),
    )
    try:
        return server, await server.listen(host, port)
    except OSError as exc:
        raise BrokerError(f"{key}: cannot listen on {host}:{port}: {exc.strerror}") from None


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
