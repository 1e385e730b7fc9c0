"""One configured ERP at run time: its HTTP session, its credential, its rate-limit state."""

from __future__ import annotations

import asyncio
import ssl
import time

import aiohttp
import structlog
from yarl import URL

from .config import ConnectorConfig, InforIonConfig, fingerprint
from .connectors import build_authenticator
from .errors import RateLimited
from .metrics import Metrics
from .tokens import TokenManager, TokenPolicy
from .types import Authenticator, Clock, Coordinator, TokenStore

log = structlog.get_logger("broker.upstream")

#: Connections kept to one ERP; a sidecar serves one app, so this is generous.
CONNECTION_LIMIT = 256


def ssl_context(config: ConnectorConfig) -> ssl.SSLContext | bool:
    """Verification on by default; ``ca_file`` for private CAs; off only when asked."""
    if not config.tls_verify:
        return False
    if config.ca_file:
        return ssl.create_default_context(cafile=config.ca_file)
    return True


class Connector:
    """Everything the proxy needs to send one request to one ERP."""

    def __init__(
        self,
        name: str,
        config: ConnectorConfig,
        route: str,
        store: TokenStore,
        coordinator: Coordinator,
        metrics: Metrics,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.name = name
        self.config = config
        self.route = route
        self.base = config.upstream_base().rstrip("/")
        self.host = URL(self.base).host or ""
        self.coordinator = coordinator
        self.metrics = metrics
        self.auth_statuses = frozenset({401, *config.auth_failure_statuses})
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=CONNECTION_LIMIT, ssl=ssl_context(config), enable_cleanup_closed=True
            ),
            # The app's bytes, untouched: no decompression, no cookie jar shared between
            # the app's requests, no redirects followed.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.timeout, sock_read=config.timeout
            ),
        )
        self.authenticator: Authenticator = build_authenticator(config, self.session, clock)
        keepalive = (
            config.grant_keepalive_days * 86400.0 if isinstance(config, InforIonConfig) else None
        )
        self.tokens = TokenManager(
            name,
            self.authenticator,
            store,
            f"{name}:{fingerprint(config)[:32]}",
            metrics,
            policy=TokenPolicy(
                token_timeout=config.token_timeout,
                refresh_ahead=config.refresh_ahead,
                login_pause_initial=config.login_backoff.initial,
                login_pause_max=config.login_backoff.max,
                keepalive=keepalive,
                revoke_on_shutdown=isinstance(config, InforIonConfig) and config.revoke_on_shutdown,
            ),
            coordinator=coordinator,
            clock=clock,
        )
        self._window_waiters = 0
        self._clock = clock
        if not config.tls_verify:
            log.warning(
                "tls_verification_disabled",
                connector=name,
                message=f"connector {name}: tls_verify is false; "
                "the ERP's certificate is not checked",
            )

    def url_for(self, rest: str, query: str) -> URL:
        """``<base>/<rest>?<query>``, byte for byte: nothing is decoded or re-encoded."""
        target = f"{self.base}/{rest}"
        if query:
            target = f"{target}?{query}"
        return URL(target, encoded=True)

    async def wait_turn(self) -> None:
        """Wait out a rate-limit window and take from the request budget, boundedly."""
        retry = self.config.retry
        while (wait := await self.coordinator.wait_window(self.name)) > 0:
            if self._window_waiters >= retry.max_queue:
                raise RateLimited(
                    f"{self._window_waiters} requests already wait for the ERP's rate-limit "
                    "window; try again later",
                    connector=self.name,
                )
            self._window_waiters += 1
            self.metrics.rate_limit_waits.labels(self.name).inc()
            self.metrics.backoff_seconds.labels(self.name, "rate_limited").inc(wait)
            try:
                await asyncio.sleep(wait)
            finally:
                self._window_waiters -= 1
        limit = self.config.rate_limit
        if limit is None:
            return
        waited = 0.0
        while (
            wait := await self.coordinator.take_budget(
                f"{self.name}:budget", limit.requests, limit.per_seconds
            )
        ) > 0:
            if waited + wait > limit.max_wait:
                raise RateLimited(
                    f"the connector's rate_limit ({limit.requests} per {limit.per_seconds:g}s) "
                    f"is spent; waited {waited:.1f}s",
                    connector=self.name,
                )
            if waited == 0.0:
                self.metrics.rate_limit_waits.labels(self.name).inc()
            waited += wait
            await asyncio.sleep(wait)

    async def start(self) -> None:
        await self.tokens.start()

    async def close(self, *, revoke: bool) -> None:
        await self.tokens.stop(revoke=revoke)
        await self.session.close()
