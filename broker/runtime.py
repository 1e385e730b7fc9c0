"""The broker's run-time state for one config: store, coordinator, connectors, the proxy's
handler, readiness. The listeners around it are :mod:`broker.app`'s; the admin listener and
the status page see a broker through :class:`Served`, so they need nothing from ``app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from .config import Config
from .coordinator import LocalCoordinator
from .metrics import Metrics
from .proxy import Proxy
from .reload import watch_credentials
from .stores import open_store
from .types import Clock, Coordinator, TokenStore
from .upstream import Connector

if TYPE_CHECKING:
    from .tracing import Tracing

log = structlog.get_logger("broker.app")


class Broker:
    """Store, connectors and proxy handler for one config."""

    def __init__(
        self,
        config: Config,
        *,
        store: TokenStore | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._given_store = store
        self.store: TokenStore | None = None
        self.coordinator: Coordinator = LocalCoordinator(clock)
        self.connectors: dict[str, Connector] = {}
        self.proxy: Proxy | None = None
        self.draining = False
        self.shutdown_requested = asyncio.Event()
        self.started_at = time.time()
        self._watcher: asyncio.Task[None] | None = None
        self.tracing: Tracing | None = None

    async def start(self) -> None:
        store = self._given_store or await open_store(self.config.store, self.metrics)
        self.store = store
        self.metrics.store_up.set_function(lambda: 1.0 if self.store_status()["up"] else 0.0)
        shared = getattr(store, "coordinator", None)
        if shared is not None:
            self.coordinator = shared
        if not self.config.store.encryption_key and not self.config.store.redis:
            log.info(
                "store_unencrypted",
                message="tokens are stored unencrypted (set store.encryption_key to encrypt them)",
            )
        try:
            for name, connector_config in self.config.connectors.items():
                self.connectors[name] = Connector(
                    name,
                    connector_config,
                    self.config.route_of(name),
                    store,
                    self.coordinator,
                    self.metrics,
                    clock=self.clock,
                )
            for connector in self.connectors.values():
                await connector.start()
        except BaseException:
            await self.close(revoke=False)
            raise
        if self.config.tracing is not None:
            from .tracing import Tracing  # OpenTelemetry is imported only when configured

            self.tracing = Tracing(self.config.tracing, self.metrics.spans_dropped)
            self.tracing.attach(self.connectors)
        self.proxy = Proxy(
            self.connectors.values(), access_log=self.config.access_log, tracer=self.tracing
        )
        interval = self.config.credentials_reload_interval
        if interval > 0 and not self.config.source.startswith("<"):
            self._watcher = asyncio.create_task(
                watch_credentials(self.config.source, self.connectors, interval),
                name="credentials-reload",
            )

    async def close(self, *, revoke: bool = True) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for connector in self.connectors.values():
            with contextlib.suppress(Exception):
                await connector.close(revoke=revoke)
        if self.store is not None and self._given_store is None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.tracing is not None:
            from .tracing import SHUTDOWN_WAIT

            # The last spans go out for a while; a dead collector delays the exit no longer.
            await asyncio.to_thread(self.tracing.close().join, SHUTDOWN_WAIT)
            self.tracing = None

    async def wait_ready(self, timeout: float) -> None:
        """Wait until every connector holds a usable credential; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            for connector in self.connectors.values():
                await connector.tokens.wait_usable(timeout)

    def store_status(self) -> dict[str, Any]:
        """The token store's health. A shared store may be down while requests are served
        (it does not make the broker unready), so it is reported beside the connectors."""
        store = self.store
        status = getattr(store, "status", None)
        if callable(status):
            return dict(status())
        kind = type(store).__name__.removesuffix("Store").lower() if store else None
        return {"type": kind, "up": store is not None}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail: dict[str, Any] = {}
        ready = not self.draining
        for name, connector in self.connectors.items():
            usable = connector.tokens.usable()
            ready = ready and usable
            status = connector.tokens.status()
            detail[name] = {
                "ready": usable,
                "token_state": status["token_state"],
                "last_error": status["last_error"],
            }
        return ready, detail


class Served(Protocol):
    """A broker behind its listeners, as the admin listener and the status page see it."""

    @property
    def broker(self) -> Broker: ...

    @property
    def proxy_url(self) -> str: ...
