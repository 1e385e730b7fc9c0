"""One configured ERP at run time: its connections, its credential, its rate-limit state."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ssl
import time

import structlog
from yarl import URL

from .audit import credential_id
from .client import Client
from .config import ConnectorConfig, IfsApps10Config, InforIonConfig, fingerprint
from .connectors import build_authenticator
from .errors import RateLimited
from .links import LinkRewriter
from .matchers import ResponseRules
from .metrics import ConnectorSeries, Metrics
from .retry import GATEWAY_TIMEOUT, RATE_LIMITED, RETRY_REASONS, TRANSIENT, RetryBudget
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


def proxy_ssl_context(config: ConnectorConfig) -> ssl.SSLContext:
    """:func:`ssl_context` as the proxy's own client needs it: always a context."""
    context = ssl_context(config)
    if context is True:
        return system_ca_context()
    if context is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.cache
def system_ca_context() -> ssl.SSLContext:
    """The verifying context on the system's CAs, one for every connector: each holds its own
    copy of the CA store (~0.8 MiB for Debian's 144), and its settings are never changed."""
    return ssl.create_default_context()


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
        base = URL(self.base)
        self.host = base.host or ""
        #: The base URL's path as it goes on the wire, without its trailing slash.
        self.base_path = base.raw_path.rstrip("/")
        self.links = LinkRewriter(self.base, route, bodies=config.rewrite_links)
        self.port = base.port or (443 if base.scheme == "https" else 80)
        self.coordinator = coordinator
        self.metrics = metrics
        # Series exist from the start, so rate()/increase() see the first event too.
        for reason in RETRY_REASONS:
            metrics.retries.labels(name, reason)
        for reason in (RATE_LIMITED, GATEWAY_TIMEOUT, TRANSIENT):  # the retries that wait
            metrics.backoff_seconds.labels(name, reason)
        metrics.rate_limit_waits.labels(name)
        #: OData paths are logged as entity set and key (broker/audit.py).
        self.odata = isinstance(config, IfsApps10Config)
        self._show_expiry(config)
        #: Requests of this connector in the proxy now (read by the in-flight gauge).
        self.inflight = 0
        self.series = ConnectorSeries(metrics, name, lambda: self.inflight)
        self.auth_statuses = frozenset({401, *config.auth_failure_statuses})
        #: auth_failure and retry_on matchers (statuses with a body or method condition).
        self.rules = ResponseRules(config.auth_failure_matchers(), config.retry_on_matchers())
        #: One client for everything this connector sends: the proxy's pool to the ERP and the
        #: token endpoint's (the same pool when it is on the ERP's host), one TLS context.
        self.client = Client(
            ssl_context=proxy_ssl_context(config),
            limit=CONNECTION_LIMIT,
            connect_timeout=config.timeout,
            read_timeout=config.timeout,
            keepalive_timeout=config.keepalive_timeout,
        )
        #: The proxy's connections to the ERP.
        self.pool = self.client.pool(base)
        self._clock = clock
        #: The config the credentials come from (replaced when a secret file changes).
        self.credentials = config
        self.authenticator: Authenticator = build_authenticator(config, self.client, clock)
        keepalive = grant_lifetime = None
        if isinstance(config, InforIonConfig):
            lifetime_days = config.grant_lifetime_days
            grant_lifetime = lifetime_days * 86400.0
            # Refreshed well before an idle grant dies: 5 days ahead (half the lifetime if
            # that is shorter), or earlier if grant_keepalive_days says so.
            keepalive_days = min(
                config.grant_keepalive_days, max(lifetime_days - 5, lifetime_days / 2)
            )
            keepalive = keepalive_days * 86400.0
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
                login_max_failures=config.login_backoff.max_failures,
                grant_lifetime=grant_lifetime,
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

    def _show_expiry(self, config: ConnectorConfig) -> None:
        """The credential id the access log shows and the ``credentials_expire`` gauge."""
        self.credential_id = credential_id(fingerprint(config))
        self.credentials_expire = config.credentials_expire
        gauge = self.metrics.credentials_expiry
        if config.credentials_expire is None:
            with contextlib.suppress(KeyError):  # no date (any more): no series
                gauge.remove(self.name)
        else:
            expires = datetime.datetime.combine(
                config.credentials_expire, datetime.time(), datetime.UTC
            )
            gauge.labels(self.name).set(expires.timestamp())

    def update_credentials(self, config: ConnectorConfig) -> bool:
        """Switch to the credentials in ``config`` if they differ; True when they did.

        Only the credentials change at run time; other settings need a restart.
        """
        key = self.store_key(config)
        if key == self.store_key(self.credentials):
            return False
        self.credentials = config
        self.authenticator = build_authenticator(config, self.client, self._clock)
        self.tokens.replace_credentials(self.authenticator, key)
        self._show_expiry(config)
        log.info("credentials_changed", connector=self.name)
        return True

    def target_for(self, rest: str, query: str) -> str:
        """The request target sent to the ERP: ``<base path>/<rest>?<query>``, byte for byte
        (nothing is decoded or re-encoded)."""
        target = f"{self.base_path}/{rest}"
        return f"{target}?{query}" if query else target

    def turn_ready(self) -> bool:
        """The cheap first check of :meth:`wait_turn`: True when nothing can make this request
        wait (no client-side rate_limit, no rate-limit window open now), so no coroutine is
        needed. False means: call :meth:`wait_turn`."""
        return self.config.rate_limit is None and self.coordinator.window_open(self.name)

    def retry_budget(self) -> RetryBudget:
        """A fresh :class:`RetryBudget` from the connector's ``retry`` settings."""
        retry = self.config.retry
        return RetryBudget(retry.max_retries, retry.max_wait, retry.max_total)

    async def wait_turn(self, budget: RetryBudget | None = None) -> None:
        """Wait out a rate-limit window, charging every second to ``budget``; then take from
        the client-side ``rate_limit``, boundedly.

        A window longer than ``budget`` has left is not slept out: :class:`RateLimited` at once
        (the ERP's own 429, if there was one, is gone by now; the send loop gives that back
        itself when the wait does not fit while it holds the answer). Without ``budget`` (API
        discovery) the wait has a fresh one of its own.
        """
        if budget is None:
            budget = self.retry_budget()
        counted = False
        while (wait := await self.coordinator.wait_window(self.name)) > 0:
            if not budget.fits(wait):
                raise RateLimited(
                    f"the ERP's rate-limit window ({wait:.1f}s left) is longer than the retry "
                    f"budget allows (retry.max_total {budget.max_total:g}s, "
                    f"{budget.left:.1f}s left)",
                    connector=self.name,
                )
            if self._window_waiters >= self.config.retry.max_queue:
                raise RateLimited(
                    f"{self._window_waiters} requests already wait for the ERP's rate-limit "
                    "window; try again later",
                    connector=self.name,
                )
            if not counted:  # one request, one wait: however often the window moves
                counted = True
                self.metrics.rate_limit_waits.labels(self.name).inc()
            self._window_waiters += 1
            try:
                await self.pause(budget, RATE_LIMITED, wait)
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

    async def pause(self, budget: RetryBudget, reason: str, seconds: float) -> None:
        """Sleep ``seconds``; what was actually slept is charged to ``budget`` and counted in
        ``erp_broker_backoff_seconds_total{reason}`` (also when the request is cancelled)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await asyncio.sleep(seconds)
        finally:
            slept = loop.time() - started
            budget.charge(slept)
            self.metrics.backoff_seconds.labels(self.name, reason).inc(slept)

    async def start(self) -> None:
        await self.tokens.start()

    async def close(self, *, revoke: bool) -> None:
        await self.tokens.stop(revoke=revoke)
        self.client.close()
