"""Tokens and the per-connector token manager.

The manager owns one connector's credential: it loads it from the store at start, refreshes
it ahead of expiry in the background, runs at most one token request at a time (waiters share
its outcome, and a cancelled waiter never cancels it), persists every new token before anyone
uses it, classifies failures, and pauses logins after the ERP rejected the credentials so the
service account is not locked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import structlog

from .connectors.oauth import CAUSES, ENDPOINT_ERROR
from .coordinator import LocalCoordinator
from .credential import Token
from .errors import (
    AuthFailed,
    ConnectorUnavailable,
    CredentialsRejected,
    EncryptionKeyError,
    RefreshRejected,
    TokenEndpointError,
    TokenError,
)
from .governor import CLEAR, LoginBackoffPolicy, LoginGovernor, LoginState
from .metrics import Metrics
from .retry import AUTH, TRANSIENT, token_retry_delay
from .types import Authenticator, Clock, Coordinator, TokenStore, TokenTracer

log = structlog.get_logger("broker.tokens")

#: Longest automatic refresh-ahead margin (a 2-hour Infor token refreshes 5 minutes early).
MAX_REFRESH_AHEAD = 300.0


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """A connector's token settings, as the manager needs them."""

    token_timeout: float = 10.0
    refresh_ahead: float | None = None
    login_pause_initial: float = 30.0
    login_pause_max: float = 900.0
    #: Rejections in a row after which logins stay paused until credentials change or an
    #: operator asks (``login_backoff.max_failures``).
    login_max_failures: int = 5
    #: How long an idle refresh grant lives (Infor: 30 days), for the idle-expiry gauge.
    grant_lifetime: float | None = None
    #: Longest a refresh grant may sit idle (Infor grants die after 30 days unused).
    keepalive: float | None = None
    revoke_on_shutdown: bool = False


class TokenManager:
    """One connector's credential: fresh, single-flight, persisted."""

    def __init__(
        self,
        name: str,
        authenticator: Authenticator,
        store: TokenStore,
        store_key: str,
        metrics: Metrics,
        *,
        policy: TokenPolicy | None = None,
        coordinator: Coordinator | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.name = name
        self._auth = authenticator
        self._store = store
        self._key = store_key
        self._metrics = metrics
        self._policy = policy or TokenPolicy()
        self._coordinator: Coordinator = coordinator or LocalCoordinator(clock)
        self._clock = clock
        self._current: Token | None = None
        self._rejected: Token | None = None  # the current token, after the ERP refused it
        self._rejected_at = 0.0
        self._inflight: asyncio.Task[Token] | None = None
        self._changed = asyncio.Event()
        self._has_token = asyncio.Event()
        self._background: asyncio.Task[None] | None = None
        # Failure state (monotonic times); login spacing lives in the governor (wall clock).
        self._governor = self._new_governor(store_key)
        self._retry_at = 0.0
        self._transient_failures = 0
        #: {"message", "cause", "kind", "at"} of the last failure, or None.
        self.last_error: dict[str, Any] | None = None
        self.last_error_kind: str | None = None
        self.last_refresh: float | None = None
        self._rng = random.Random()
        #: Spans of token waits and requests, set when ``tracing`` is configured.
        self.tracer: TokenTracer | None = None
        metrics.connector_up.labels(name).set(0)
        metrics.token_expiry.labels(name).set(0)
        metrics.login_paused.labels(name).set(0)
        metrics.login_suspended.labels(name).set(0)
        metrics.grant_idle_expiry.labels(name).set(0)
        for cause in CAUSES:
            metrics.login_failures.labels(name, cause)
        # Series exist from the start, so rate()/increase() see the first failure too.
        for grant in {authenticator.login_grant, "refresh_token"}:
            for outcome in ("success", "failure"):
                metrics.token_requests.labels(name, grant, outcome)
        metrics.refresh_waiters.labels(name)
        metrics.store_replication_unacknowledged.labels(name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt a persisted token if it is still valid, then keep the credential fresh."""
        stored = await self._load_stored()
        if stored is not None and (
            not stored.expired(self._clock()) or stored.refresh_usable(self._clock())
        ):
            self._set_current(stored, persisted=True)
            log.info(
                "token_loaded",
                connector=self.name,
                expires_at=stored.expires_at,
                valid=not stored.expired(self._clock()),
            )
        self._background = asyncio.create_task(self._keep_fresh(), name=f"refresh-{self.name}")

    async def stop(self, *, revoke: bool = False) -> None:
        """Stop refreshing; revoke the grant if asked, the connector revokes on shutdown, and
        this process owns the grant alone (never a grant other replicas share)."""
        for task in (self._background, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background = self._inflight = None
        token = self._current
        if (
            revoke
            and self._policy.revoke_on_shutdown
            and token is not None
            and not self._store.shared
        ):
            try:
                async with asyncio.timeout(self._policy.token_timeout):
                    await self._auth.revoke(token)
                await self._store.delete(self._key)
                self._current = None  # given back: never used, or revoked, again
                log.info("token_revoked", connector=self.name)
            except (TokenError, TimeoutError, OSError) as exc:
                log.warning("token_revoke_failed", connector=self.name, error=str(exc))

    # -- what requests use -------------------------------------------------------------------

    @property
    def current(self) -> Token | None:
        return self._current

    def usable(self) -> bool:
        return self.valid() is not None

    @property
    def refreshing(self) -> bool:
        """A token request is in flight (the status page shows it)."""
        return self._inflight is not None and not self._inflight.done()

    async def wait_usable(self, timeout: float) -> None:
        """Wait until the connector has held a usable credential (readiness, demo, tests)."""
        async with asyncio.timeout(timeout):
            while not self.usable():
                self._has_token.clear()
                await self._has_token.wait()

    def valid(self) -> Token | None:
        """Fast path of :meth:`get`: the current credential if usable now, else None."""
        token = self._current
        if token is not None and token is not self._rejected and not token.expired(self._clock()):
            return token
        return None

    async def get(self) -> Token:
        """A credential that has not expired, waiting for a token request if needed (callers
        on a hot path try :meth:`valid` first, which needs no coroutine)."""
        token = self.valid()
        if token is not None:
            return token
        return await self._wait_for_new(reason="expired" if self._current else "none")

    async def reject(self, token: Token) -> Token:
        """The ERP refused ``token``: get a new one, unless another request already did."""
        if token is self._current and token is not self._rejected:
            self._rejected = token
            self._rejected_at = self._clock()
            self._update_gauges()
            log.info("token_rejected_by_erp", connector=self.name)
        current = self._current
        if current is not None and current is not token and current is not self._rejected:
            if not current.expired(self._clock()):
                return current
        return await self._wait_for_new(reason="rejected")

    async def refresh_now(self) -> Token:
        """Force a token request now (admin ``refresh``); bypasses a login pause. The current
        token stays in use if the request fails."""
        self._retry_at = 0.0
        wait = await self._governor.resume()
        self._update_login_gauges()
        if wait > 0:
            raise ConnectorUnavailable(
                f"logins resume in {wait:.0f}s: never two failed logins within "
                f"login_backoff.initial ({self._policy.login_pause_initial:g}s), so the "
                "identity provider does not lock the service account",
                connector=self.name,
            )
        return await self._wait_for_new(reason="admin", force=True)

    def replace_credentials(self, authenticator: Authenticator, store_key: str) -> None:
        """The configured credentials changed (a rotated secret file): use them from now on.

        A token that is still valid keeps serving; a login pause ends, so a connector that was
        stopped by rejected credentials tries the new ones at once.
        """
        self._auth = authenticator
        self._key = store_key
        governor = self._new_governor(store_key)
        governor.carry_over(self._governor)
        self._governor = governor
        self._retry_at = 0.0
        self._transient_failures = 0
        self._update_login_gauges()
        self._changed.set()

    def wake(self) -> None:
        """Re-plan the background refresh now (the clock jumped, a setting changed)."""
        self._changed.set()

    def _new_governor(self, store_key: str) -> LoginGovernor:
        policy = self._policy
        backoff = LoginBackoffPolicy(
            policy.login_pause_initial, policy.login_pause_max, policy.login_max_failures
        )
        return LoginGovernor(store_key, backoff, self._coordinator, self._clock)

    # -- single flight -----------------------------------------------------------------------

    async def _wait_for_new(
        self, *, reason: str, force: bool = False, background: bool = False
    ) -> Token:
        now = time.monotonic()
        if not force and self._inflight is None:
            if self._governor.blocked_for() > 0:
                raise ConnectorUnavailable(self._paused_message(), connector=self.name)
            if now < self._retry_at:
                raise AuthFailed(
                    f"no credential could be obtained: {self._error_message()}; next try in "
                    f"{self._retry_at - now:.0f}s",
                    connector=self.name,
                )
        tracer = self.tracer
        with (
            contextlib.nullcontext()
            if tracer is None
            else tracer.token_wait(self.name, reason, joined=self._inflight is not None)
        ) as span:
            task = self._inflight
            if task is None or (force and task.done()):
                # (A finished flight whose done-callback has not run yet is not joined by a
                # forced request: it asks for a new token.)
                task = self._inflight = asyncio.create_task(
                    self._obtain(reason, force=force),
                    name=f"token-{self.name}",
                    # In the wait's span: the token request's span is its child.
                    context=None if span is None else span.context,
                )
                task.add_done_callback(self._flight_done)
            elif not background:
                self._metrics.refresh_waiters.labels(self.name).inc()
            try:
                # shield: a waiter that gives up (timeout, client gone) never cancels the request
                # the others are waiting for.
                async with asyncio.timeout(self._policy.token_timeout):
                    return await asyncio.shield(task)
            except TimeoutError:
                raise AuthFailed(
                    f"no credential within {self._policy.token_timeout:g}s: the token endpoint "
                    "is slow or unreachable",
                    connector=self.name,
                ) from None
            except CredentialsRejected as exc:
                raise AuthFailed(
                    f"the ERP rejected the configured credentials ({exc.cause}): {exc}"
                    + (f"; {self._paused_message()}" if self._governor.state.suspended else ""),
                    connector=self.name,
                ) from None
            except TokenError as exc:
                raise AuthFailed(
                    f"no credential could be obtained ({exc.cause}): {exc}", connector=self.name
                ) from None

    def _flight_done(self, task: asyncio.Task[Token]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: waiters and the background loop report it

    async def _obtain(self, reason: str, *, force: bool = False) -> Token:
        """Refresh or log in (the one token request in flight), then persist and publish."""
        async with self._coordinator.refresh_lock(self._key):
            # Another replica may have just obtained a token: use it rather than ask for one,
            # and never refresh from a refresh token that it has rotated since.
            newest = await self._adopt_from_store()
            if (
                newest is not None
                and newest is self._current
                and not force
                # A token the fleet obtained before the ERP refused ours may have died with
                # it (a session ended): refresh from it, or log in, rather than replay with it.
                and not (reason == "rejected" and newest.obtained_at <= self._rejected_at)
            ):
                return newest
            previous = newest or self._current
            now = self._clock()
            if self._transient_failures:  # the token request again, after the policy's wait
                self._metrics.retries.labels(self.name, TRANSIENT).inc()
            try:
                token: Token | None = None
                if previous is not None and previous.refresh_usable(now):
                    try:
                        token = await self._call("refresh_token", self._auth.refresh(previous))
                    except RefreshRejected as exc:
                        # Not a credential rejection: one fresh login follows (a retry).
                        self._metrics.retries.labels(self.name, AUTH).inc()
                        log.info(
                            "refresh_rejected", connector=self.name, cause=exc.cause, error=str(exc)
                        )
                if token is None:
                    # The fleet's login spacing, read with the fleet's refresh lock held: all
                    # replicas together make at most one failed login per interval.
                    await self._governor.sync()
                    if self._governor.blocked_for() > 0:
                        self._update_login_gauges()
                        raise ConnectorUnavailable(self._paused_message(), connector=self.name)
                    token = await self._call(self._auth.login_grant, self._auth.login())
            except CredentialsRejected as exc:
                await self._on_rejected(exc)
                raise
            except TokenError as exc:
                self._on_transient(exc)
                raise
            await self._persist(token)
            await self._governor.succeeded()
            self._set_current(token)
            log.info(
                "token_obtained",
                connector=self.name,
                grant=token.grant,
                reason=reason,
                expires_in=None if token.expires_at is None else round(token.expires_at - now, 1),
                lifetime_source=token.lifetime_source,
            )
            return token

    async def _call(self, grant: str, request: Awaitable[Token]) -> Token:
        """One token request, timed, counted and bounded by the token timeout."""
        tracer = self.tracer
        with contextlib.nullcontext() if tracer is None else tracer.token_request(self.name, grant):
            started = time.perf_counter()
            outcome = "failure"
            try:
                async with asyncio.timeout(self._policy.token_timeout):
                    token = await request
                outcome = "success"
                return token
            except TimeoutError:
                self._metrics.login_failures.labels(self.name, ENDPOINT_ERROR).inc()
                raise TokenEndpointError(
                    f"the token endpoint did not answer within {self._policy.token_timeout:g}s"
                ) from None
            except TokenError as exc:
                self._metrics.login_failures.labels(self.name, exc.cause).inc()
                raise
            finally:
                self._metrics.token_requests.labels(self.name, grant, outcome).inc()
                self._metrics.token_request_duration.labels(self.name).observe(
                    time.perf_counter() - started
                )

    # -- persistence ---------------------------------------------------------------------------

    async def _load_stored(self) -> Token | None:
        try:
            return await self._store.load(self._key)
        except EncryptionKeyError:
            raise  # a startup error: the operator must fix the key
        except Exception as exc:  # a broken store must not stop the connector
            self._metrics.store_errors.labels("load").inc()
            log.error("store_load_failed", connector=self.name, error=str(exc))
            return None

    async def _adopt_from_store(self) -> Token | None:
        """With a shared store, the fleet's token if another replica obtained it after ours:
        adopted when still valid, and in any case the one to refresh from (its refresh token
        may have rotated ours away)."""
        if not self._store.shared:
            return None
        stored = await self._load_stored()
        current = self._current
        if (
            stored is None
            or (current is not None and stored.obtained_at <= current.obtained_at)
            or (current is not None and stored.access == current.access)
        ):
            return None
        if not stored.expired(self._clock()):
            self._set_current(stored, persisted=True)
            log.info("token_adopted", connector=self.name)
        return stored

    async def _persist(self, token: Token) -> None:
        # Written before use: with rotating refresh tokens, the old one is already dead.
        try:
            await self._store.save(self._key, token)
        except Exception as exc:
            self._metrics.store_errors.labels("save").inc()
            log.error("store_save_failed", connector=self.name, error=str(exc))

    # -- state ----------------------------------------------------------------------------------

    def _set_current(self, token: Token, *, persisted: bool = False) -> None:
        self._current = token
        self._rejected = None
        self._governor.state = CLEAR  # someone in the fleet logged in: the account works
        self._retry_at = 0.0
        self._transient_failures = 0
        # A loaded or adopted token was obtained (by us before a restart, or by another
        # replica) at obtained_at: that is its last refresh too.
        self.last_refresh = token.obtained_at
        self._metrics.token_last_refresh.labels(self.name).set(token.obtained_at)
        if not persisted:
            self.last_error = self.last_error_kind = None
        self._update_login_gauges()
        self._update_gauges()
        self._changed.set()
        self._has_token.set()

    def refresh_gauges(self) -> None:
        """Recompute the gauges that depend on the clock (called at scrape time)."""
        self._update_gauges()

    def _update_gauges(self) -> None:
        token = self._current
        self._metrics.token_expiry.labels(self.name).set(
            token.expires_at if token is not None and token.expires_at is not None else 0
        )
        self._metrics.connector_up.labels(self.name).set(1 if self.usable() else 0)
        lifetime = self._policy.grant_lifetime
        self._metrics.grant_idle_expiry.labels(self.name).set(
            token.obtained_at + lifetime
            if lifetime is not None and token is not None and token.refresh
            else 0
        )

    def _update_login_gauges(self) -> None:
        state = self._governor.state
        self._metrics.login_paused.labels(self.name).set(1 if state.failures else 0)
        self._metrics.login_suspended.labels(self.name).set(1 if state.suspended else 0)

    def _record_error(self, exc: TokenError) -> None:
        self.last_error = {
            "message": str(exc),
            "cause": exc.cause,
            "kind": exc.kind,
            "at": self._clock(),
        }
        self.last_error_kind = exc.kind

    def _error_message(self) -> str:
        return self.last_error["message"] if self.last_error else "unknown error"

    def _paused_message(self) -> str:
        """Why logins are paused, what may be wrong, and what to do (never a secret)."""
        state = self._governor.state
        cause = state.cause or "invalid_credentials"
        if state.suspended:
            return (
                f"logins are paused after {state.failures} credential rejections in a row "
                f"({cause}): the service account may be locked by the identity provider "
                "(e.g. Keycloak brute-force detection). Check: "
                f"{self._error_message()}. Then update the secret, or call "
                f"POST /connectors/{self.name}/refresh"
            )
        wait = self._governor.blocked_for()
        return (
            f"logins are paused for {wait:.0f}s because the ERP rejected the configured "
            f"credentials ({cause}; {self._error_message()})"
        )

    async def _on_rejected(self, exc: CredentialsRejected) -> None:
        state: LoginState = await self._governor.rejected(exc.cause)
        self._record_error(exc)
        self._update_login_gauges()
        self._update_gauges()
        # Logged once per state change, with the pause: not once per request.
        log.error(
            "credentials_rejected",
            connector=self.name,
            cause=exc.cause,
            error=str(exc),
            failures_in_a_row=state.failures,
            login_paused_seconds=None if state.suspended else state.step,
            logins_suspended=state.suspended,
        )

    def _on_transient(self, exc: TokenError) -> None:
        delay = token_retry_delay(self._transient_failures, self._rng)
        self._transient_failures += 1
        self._retry_at = time.monotonic() + delay
        self._record_error(exc)
        self._update_gauges()
        log.warning(
            "token_request_failed",
            connector=self.name,
            cause=exc.cause,
            error=str(exc),
            retry_in=round(delay, 2),
            failures=self._transient_failures,
        )

    def status(self) -> dict[str, Any]:
        """What ``/connectors`` shows: state and times, never a secret."""
        token = self._current
        now = self._clock()
        login = self._governor.state
        if self._governor.blocked_for() > 0:
            state = "paused"
        elif token is None:
            state = "none"
        elif token is self._rejected:
            state = "rejected"
        elif token.expired(now):
            state = "expired"
        else:
            state = "valid"
        return {
            "token_state": state,
            "expires_at": token.expires_at if token else None,
            "expires_in": None
            if token is None or token.expires_at is None
            else round(token.expires_at - now, 1),
            "lifetime_source": token.lifetime_source if token else None,
            "has_refresh_token": bool(token and token.refresh),
            "last_refresh": self.last_refresh,
            "last_error": self.last_error,
            "last_error_kind": self.last_error_kind,
            "login": {
                "failures_in_a_row": login.failures,
                "next_login_at": login.not_before or None,
                "suspended": login.suspended,
            },
        }

    # -- background refresh -------------------------------------------------------------------

    def _next_due(self) -> float:
        """Seconds until the background loop should request a token (may be <= 0)."""
        mono = time.monotonic()
        if (blocked := self._governor.blocked_for()) > 0:
            return blocked
        if mono < self._retry_at:
            return self._retry_at - mono
        token = self._current
        if token is None or token is self._rejected:
            return 0.0
        now = self._clock()
        due = float("inf")
        if token.expires_at is not None:
            lifetime = max(0.0, token.expires_at - token.obtained_at)
            ahead = self._policy.refresh_ahead
            if ahead is None:
                ahead = min(MAX_REFRESH_AHEAD, 0.2 * lifetime)
            due = token.expires_at - ahead - now
        if self._policy.keepalive is not None and token.refresh:
            due = min(due, token.obtained_at + self._policy.keepalive - now)
        return due

    def _background_reason(self) -> str:
        """Why the background loop asks for a token: the first login is not a refresh."""
        token = self._current
        if token is None:
            return "startup" if self.last_refresh is None else "none"
        if token is self._rejected:
            return "rejected"
        return "expired" if token.expired(self._clock()) else "refresh_ahead"

    async def _keep_fresh(self) -> None:
        while True:
            self._changed.clear()
            due = self._next_due()
            if due > 0:
                with contextlib.suppress(TimeoutError):
                    # Wake early when the token changes (a 401 refresh, an admin refresh).
                    async with asyncio.timeout(min(due, 3600.0)):
                        await self._changed.wait()
                continue
            try:
                await self._wait_for_new(reason=self._background_reason(), background=True)
            except (AuthFailed, ConnectorUnavailable):
                pass  # state, logs and metrics were updated where it failed
            except Exception as exc:  # never let the loop die
                log.exception("refresh_loop_error", connector=self.name, error=str(exc))
                await asyncio.sleep(1.0)
            else:
                self._update_gauges()
