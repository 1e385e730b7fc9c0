"""One configured ERP at run time: its HTTP session, its credential, its rate-limit state."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from .config import ConnectorConfig, InforIonConfig, fingerprint
from .connectors import build_authenticator
from .errors import RateLimited
from .metrics import ConnectorSeries, Metrics
from .tokens import LocalCoordinator, TokenManager, TokenPolicy
from .types import Authenticator, Clock, Coordinator, TokenStore

log = structlog.get_logger("broker.upstream")

#: Connections kept to one ERP; a sidecar serves one app, so this is generous.
CONNECTION_LIMIT = 256
#: Bytes of a response body read ahead per connection (aiohttp's default is 64 KiB): large
#: bodies move in fewer, larger steps; memory per stream stays bounded (about twice this).
READ_BUFSIZE = 256 * 1024
#: Headers aiohttp would add on its own; the proxy sends the app's request without them.
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_SKIP_AUTO_LIST: CIMultiDict[None] = CIMultiDict((h, None) for h in sorted(SKIP_AUTO_HEADERS))


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, minus the per-request cost of ``skip_auto_headers``.

    For the proxy's fixed set (all of aiohttp's automatic headers) the outcome is known:
    nothing is added, and the set is what later checks (``Content-Type``) consult. aiohttp
    builds and merges three header dicts to find that out, on every request; here it is a
    constant. Any other set (token requests) takes aiohttp's own path.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if skip_auto_headers is not None and skip_auto_headers == SKIP_AUTO_HEADERS:
            self._skip_auto_headers = _SKIP_AUTO_LIST
            return
        super().update_auto_headers(skip_auto_headers)


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
        # Series exist from the start, so rate()/increase() see the first event too.
        for reason in ("auth", "rate_limited", "gateway_timeout"):
            metrics.retries.labels(name, reason)
        for reason in ("rate_limited", "gateway_timeout"):
            metrics.backoff_seconds.labels(name, reason)
        metrics.rate_limit_waits.labels(name)
        #: Requests of this connector in the proxy now (read by the in-flight gauge).
        self.inflight = 0
        self.series = ConnectorSeries(metrics, name, lambda: self.inflight)
        self.auth_statuses = frozenset({401, *config.auth_failure_statuses})
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=CONNECTION_LIMIT, ssl=ssl_context(config), enable_cleanup_closed=True
            ),
            # The app's bytes, untouched: no decompression, no cookie jar shared between
            # the app's requests, no redirects followed.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=_Request,
            read_bufsize=READ_BUFSIZE,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.timeout, sock_read=config.timeout
            ),
        )
        self._clock = clock
        #: The config the credentials come from (replaced when a secret file changes).
        self.credentials = config
        self.authenticator: Authenticator = build_authenticator(config, self.session, clock)
        keepalive = (
            config.grant_keepalive_days * 86400.0 if isinstance(config, InforIonConfig) else None
        )
        self.tokens = TokenManager(
            name,
            self.authenticator,
            store,
            self.store_key(config),
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
        if not config.tls_verify:
            log.warning(
                "tls_verification_disabled",
                connector=name,
                message=f"connector {name}: tls_verify is false; "
                "the ERP's certificate is not checked",
            )

    def store_key(self, config: ConnectorConfig) -> str:
        return f"{self.name}:{fingerprint(config)[:32]}"

    def update_credentials(self, config: ConnectorConfig) -> bool:
        """Switch to the credentials in ``config`` if they differ; True when they did.

        Only the credentials change at run time; other settings need a restart.
        """
        key = self.store_key(config)
        if key == self.store_key(self.credentials):
            return False
        self.credentials = config
        self.authenticator = build_authenticator(config, self.session, self._clock)
        self.tokens.replace_credentials(self.authenticator, key)
        log.info("credentials_changed", connector=self.name)
        return True

    def url_for(self, rest: str, query: str) -> URL:
        """``<base>/<rest>?<query>``, byte for byte: nothing is decoded or re-encoded."""
        target = f"{self.base}/{rest}"
        if query:
            target = f"{target}?{query}"
        return URL(target, encoded=True)

    def turn_ready(self) -> bool:
        """Fast path of :meth:`wait_turn`: True when nothing can make this request wait (no
        client-side rate_limit, a local coordinator and no rate-limit window open now), so
        no coroutine is needed. False means: call :meth:`wait_turn`."""
        coordinator = self.coordinator
        return (
            self.config.rate_limit is None
            and type(coordinator) is LocalCoordinator
            and coordinator.window_open(self.name)
        )

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
