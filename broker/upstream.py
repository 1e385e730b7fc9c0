"""One configured ERP at run time: its connections, its credential, its rate-limit state, and
the one send loop (:meth:`Connector.exchange`) every request to it goes through: the proxy's and
API discovery's."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from multidict import CIMultiDict
from yarl import URL

from .audit import credential_id
from .client import TRANSPORT_ERRORS, Client, transport_failure
from .config import ConnectorConfig, IfsApps10Config, InforIonConfig, fingerprint
from .connectors import build_authenticator
from .credential import Token
from .errors import ProxyError, RateLimited, UpstreamTimeout, UpstreamUnreachable
from .http1 import Response as Upstream
from .http1 import StaleConnection, UpstreamError
from .links import LinkRewriter
from .matchers import ResponseRules
from .metrics import ConnectorSeries, Metrics
from .retry import (
    AUTH,
    GATEWAY_TIMEOUT,
    IDEMPOTENT_METHODS,
    RATE_LIMITED,
    RETRY_REASONS,
    STALE_CONNECTION,
    TRANSIENT,
    RetryBudget,
    backoff_delay,
    parse_retry_after,
    should_retry,
)
from .tokens import TokenManager, TokenPolicy
from .types import (
    AttemptTracer,
    Authenticator,
    Clock,
    Coordinator,
    CredentialSource,
    TokenStore,
)

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


@dataclass(slots=True)
class Body:
    """A request body: kept in memory when small enough to replay, else streamed once."""

    data: bytes | None
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None

    @property
    def replayable(self) -> bool:
        return self.stream is None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        return self.data if self.stream is None else self.stream


#: The body of every request without one (never mutated).
NO_BODY = Body(data=None)


class reading:
    """Around reading an ERP answer's body: its failures become broker errors, and a body left
    half-read (any failure, a cancelled request too) closes the connection: it never goes back
    to the pool. (A class: a generator context manager cost ~2 µs per request.)"""

    __slots__ = ("upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        if exc is None:
            return
        self.upstream.close()
        # The ERP's read timeout (UpstreamReadTimeout); the app's are ConnectionErrors.
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout("the ERP stopped sending its response") from None
        if isinstance(exc, UpstreamError):
            raise UpstreamUnreachable(f"the ERP broke off its response: {exc}") from None


class Connector:
    """One ERP, as the proxy and API discovery ask for it: :meth:`exchange` (the send loop:
    a credential, a turn, the attempts, every retry), :meth:`target_for` and :meth:`record`.
    Its parts (``tokens``, ``pool``, ``authenticator``, ``coordinator``, ``rules``) stay behind
    those methods."""

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

    def record(self, method: str, status: int, elapsed: float) -> None:
        """One request answered: ``erp_broker_requests_total`` and its duration."""
        series = self.series
        series.count_request(method, status)
        series.request_duration.observe(elapsed)

    async def credential(self, source: CredentialSource | None = None) -> Token:
        """A credential to send with: ``source``'s, else the token manager's (waiting for a
        token request if needed; :meth:`exchange` tries ``tokens.valid()`` first, which needs
        no coroutine)."""
        return await (self.tokens if source is None else source).get()

    async def exchange(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        trace: AttemptTracer | None = None,
        credentials: CredentialSource | None = None,
    ) -> tuple[Upstream, bytes | None, int]:
        """The send loop: the ERP's answer to one request, the body a matcher read of it (or
        None), and the attempts made. Every resend of any request to this ERP is decided here,
        from ``retry.py``'s policy, and counted in ``erp_broker_retries_total{reason}``.

        - ``stale_connection``: a pooled connection the ERP had closed; once more on a new
          one, when idempotent and replayable (the ERP never saw it).
        - ``auth``: a status in ``auth_statuses`` or an ``auth_failure`` matcher; the
          credential is rejected and the request replayed once, when replayable.
        - ``transient``: a ``retry_on`` matcher; once, after a backoff, within the budget.
        - ``rate_limited`` (429) and ``gateway_timeout`` (504, idempotent only), from
          :func:`should_retry`: after ``Retry-After`` (else a backoff), within the budget.

        Every wait of the request -- out a rate-limit window (its own 429's, or one open when it
        came or made longer meanwhile by others) and every backoff -- is charged to its one
        :class:`RetryBudget`, made when first needed, so ``retry.max_total`` bounds the time it
        waits in all. When the budget cannot take a wait: with the ERP's 429/504 in hand, that
        answer is returned as it came; with no answer in hand (the request is about to be sent
        and the open window is longer than its budget has left), :meth:`wait_turn` raises
        :class:`RateLimited` at once rather than sleep it out. ``credentials``: where the
        credential comes from when not the token manager (a command-line fresh login).
        """
        config = self.config
        budget: RetryBudget | None = None  # made on the first wait: most requests need none
        # The credential and the turn are synchronous checks when nothing needs waiting for.
        token = self.tokens.valid() if credentials is None else None
        if token is None:
            token = await self.credential(credentials)
        auth_replayed = transient_retried = False
        # A request found a pooled connection closed by the ERP is sent once more, on a new
        # connection, when that is safe (the ERP never saw it; idempotent, body replayable).
        stale_replay = method in IDEMPOTENT_METHODS and body.replayable
        fresh = False
        attempts = 0
        try:
            while True:
                if not self.turn_ready():
                    if budget is None:
                        budget = self.retry_budget()
                    await self.wait_turn(budget)  # a window too long for it: rate_limited
                self.authenticator.apply(headers, token)
                attempts += 1
                if trace is not None:
                    trace.attempt(self, method, target, headers, attempts)
                upstream = await self.send(
                    method, target, headers, body, fresh=fresh, stale_replay=stale_replay
                )
                if upstream is None:
                    stale_replay = False
                    fresh = True
                    self.metrics.retries.labels(self.name, STALE_CONNECTION).inc()
                    continue
                status = upstream.status
                if trace is not None:
                    trace.answered(status)
                verdict: str | None = None
                data: bytes | None = None  # the body, when a matcher had to read it
                if status in self.rules.statuses:
                    verdict, data = await self.inspect(upstream, method)
                if (
                    (status in self.auth_statuses or verdict == AUTH)
                    and not auth_replayed
                    and body.replayable
                ):
                    upstream.release()
                    auth_replayed = True
                    if trace is not None:
                        trace.replay(status)
                    self.metrics.retries.labels(self.name, AUTH).inc()
                    token = await (credentials or self.tokens).reject(token)
                    continue
                if verdict == TRANSIENT and not transient_retried and body.replayable:
                    if budget is None:
                        budget = self.retry_budget()
                    pause = backoff_delay(
                        budget.retries, config.retry.base_delay, config.retry.max_wait
                    )
                    if budget.allows(pause):
                        # Retried once (IFS's MI_MODIFIED_ERROR: raised before anything executed).
                        upstream.release()
                        budget.retry()
                        transient_retried = True
                        self.metrics.retries.labels(self.name, TRANSIENT).inc()
                        await self.pause(budget, TRANSIENT, pause)
                        continue
                reason = should_retry(status, method)
                if reason is not None and body.replayable:
                    if budget is None:
                        budget = self.retry_budget()
                    wait = parse_retry_after(upstream.headers.get("Retry-After"), time.time())
                    if wait is None:
                        wait = backoff_delay(
                            budget.retries, config.retry.base_delay, config.retry.max_wait
                        )
                    if reason == RATE_LIMITED:
                        # What it would sleep: its own wait, or a longer window open already.
                        try:
                            window = await self.coordinator.wait_window(self.name)
                        except BaseException:  # the held answer must not stay counted as busy
                            upstream.close()
                            raise
                        wait = max(wait, window)
                    if budget.allows(wait):
                        upstream.release()
                        budget.retry()
                        if trace is not None:
                            trace.retry_wait(reason, status, wait)
                        self.metrics.retries.labels(self.name, reason).inc()
                        if reason == RATE_LIMITED:
                            # Every request to this connector waits out the same window, this
                            # one in wait_turn at the top of the loop, charged to its budget.
                            await self.coordinator.set_window(self.name, time.time() + wait)
                        else:
                            await self.pause(budget, reason, wait)
                        continue
                return upstream, data, attempts
        except ProxyError as exc:
            exc.attempts = attempts  # for the access line: what was sent before it failed
            raise

    async def inspect(self, upstream: Upstream, method: str) -> tuple[str | None, bytes | None]:
        """What the connector's matchers make of an answer (reading a small body if needed)."""
        with reading(upstream):
            return await self.rules.verdict(upstream, method)

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        *,
        fresh: bool = False,
        stale_replay: bool = False,
    ) -> Upstream | None:
        """One attempt: the ERP's answer head; None when the pooled connection was stale and
        ``stale_replay`` allows sending again. The one map from transport failures to broker
        errors (504 ``upstream_timeout``, 502 ``upstream_unreachable``)."""
        started = time.perf_counter()
        try:
            return await self.pool.request(
                method, target, headers.items(), body.payload(), length=body.length, fresh=fresh
            )
        except StaleConnection:
            if stale_replay:
                return None
            raise UpstreamUnreachable(
                f"cannot reach {self.host}: the ERP closed the connection", connector=self.name
            ) from None
        except TRANSPORT_ERRORS as exc:
            failure = transport_failure(exc, self.pool)
            error = UpstreamTimeout if failure.timeout else UpstreamUnreachable
            raise error(failure.describe("the ERP"), connector=self.name) from None
        finally:
            self.series.upstream_duration.observe(time.perf_counter() - started)

    def turn_ready(self) -> bool:
        """The cheap first check of :meth:`wait_turn`: True when nothing can make this request
        wait (no client-side rate_limit, no rate-limit window open now), so no coroutine is
        needed. False means: call :meth:`wait_turn`."""
        return self.config.rate_limit is None and self.coordinator.window_open(self.name)

    def retry_budget(self) -> RetryBudget:
        """A fresh :class:`RetryBudget` from the connector's ``retry`` settings."""
        retry = self.config.retry
        return RetryBudget(retry.max_retries, retry.max_wait, retry.max_total)

    async def wait_turn(self, budget: RetryBudget) -> None:
        """Wait out a rate-limit window, charging every second actually slept to ``budget``
        (the request's, in the send loop: its first wait spends from it too); then take from
        the client-side ``rate_limit``, boundedly.

        A window longer than ``budget`` has left is not slept out: :class:`RateLimited` at once
        (the ERP's own 429, if there was one, is gone by now; the send loop gives that back
        itself when the wait does not fit while it holds the answer).
        """
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
