"""The broker's extension points, kept small and in one place.

* :class:`Authenticator` — one per ERP kind: acquires, refreshes, revokes and applies a
  credential. It never retries and never decides policy; :class:`~broker.tokens.TokenManager`
  and the proxy's send loop do.
* :class:`CredentialSource` — where a caller outside the proxy (API discovery) gets a
  credential: the running connector's token manager, or a fresh login from the config.
* :class:`TokenStore` — persistence of tokens (SQLite, Redis, memory).
* :class:`Coordinator` — what a fleet must share: the refresh lock, rate-limit windows and
  the request budget. Local (one process) or Redis (many replicas).
* :class:`TokenTracer` — the spans of token waits and token requests (``broker/tracing.py``,
  present only when ``tracing`` is configured).
* :class:`AttemptTracer` — the send loop's hooks into one request's trace (its attempts,
  replays and retry waits).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from multidict import CIMultiDict

if TYPE_CHECKING:
    from .credential import Token

#: Wall-clock seconds (``time.time``); injectable so token expiry can be tested.
Clock = Callable[[], float]


class Authenticator(Protocol):
    """How one ERP kind obtains and presents a credential."""

    #: The grant a plain login uses, for metrics (``password`` or ``session``).
    login_grant: str

    async def login(self) -> Token:
        """Obtain a credential from the configured secrets (password grant / session login)."""
        ...

    async def refresh(self, token: Token) -> Token:
        """Use ``token``'s refresh token; raise RefreshRejected when it is dead."""
        ...

    async def revoke(self, token: Token) -> None:
        """Give the grant back to the ERP (best effort)."""
        ...

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        """Put the credential on an outgoing request."""
        ...


class CredentialSource(Protocol):
    """A current credential, and a new one once the ERP has refused it."""

    async def get(self) -> Token: ...

    async def reject(self, token: Token) -> Token:
        """``token`` was refused (401): return another, obtaining one if needed."""
        ...


class AttemptTracer(Protocol):
    """What the send loop tells one request's trace (``tracing.RequestTrace``)."""

    def attempt(
        self, connector: Any, method: str, target: str, headers: CIMultiDict[str], n: int
    ) -> None:
        """Attempt ``n`` (from 1) is about to go to the ERP with ``headers``."""
        ...

    def answered(self, status: int) -> None: ...

    def replay(self, status: int) -> None:
        """The ERP refused the credential: the request goes again with a new one."""
        ...

    def retry_wait(self, reason: str, status: int, seconds: float) -> None: ...


class TokenStore(Protocol):
    """Durable token storage, keyed by ``<connector>:<credential fingerprint>``."""

    async def load(self, key: str) -> Token | None: ...

    async def save(self, key: str, token: Token) -> None:
        """Durably write ``token`` (it must survive a crash the moment this returns)."""
        ...

    async def delete(self, key: str) -> None: ...

    async def get_blob(self, key: str) -> bytes | None:
        """Other cached data (discovered OpenAPI documents)."""
        ...

    async def put_blob(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...

    @property
    def shared(self) -> bool:
        """True when other processes use the same tokens (then never revoke them)."""
        ...


class Coordinator(Protocol):
    """What replicas of one fleet share beyond the tokens themselves."""

    def refresh_lock(self, key: str) -> AbstractAsyncContextManager[None]:
        """Held while a token request for ``key`` runs: one in flight across the fleet."""
        ...

    async def wait_window(self, key: str) -> float:
        """Seconds until the connector's current rate-limit window closes (0 if none)."""
        ...

    def window_open(self, key: str) -> bool:
        """True when no rate-limit window holds ``key`` now: the synchronous first check of
        :meth:`wait_window`, from what this process knows."""
        ...

    async def set_window(self, key: str, until: float) -> None:
        """Extend the connector's rate-limit window to wall-clock time ``until``."""
        ...

    async def take_budget(self, key: str, requests: int, per_seconds: float) -> float:
        """Take one request from a sliding-window budget; return 0, or seconds to wait first."""
        ...

    async def login_state(self, key: str) -> bytes | None:
        """The login governor's state for a service account (:mod:`broker.governor`)."""
        ...

    async def set_login_state(self, key: str, value: bytes | None, ttl: float) -> None:
        """Replace (or, with None, clear) that state; it expires after ``ttl`` seconds."""
        ...


class TokenSpan(Protocol):
    """An open span around a token wait or a token request."""

    #: A copy of the current context with this span current: a task started in it is a child.
    context: contextvars.Context

    def set(self, key: str, value: str | bool) -> None:
        """Set an attribute (never a secret)."""
        ...


class TokenTracer(Protocol):
    """Spans for the token manager (the proxy's spans are broker/tracing.py's own)."""

    def token_wait(
        self, connector: str, reason: str, *, joined: bool
    ) -> AbstractContextManager[TokenSpan]:
        """A request (or the refresh loop) waiting for a token request's outcome."""
        ...

    def token_request(self, connector: str, grant: str) -> AbstractContextManager[TokenSpan]:
        """One request to the token or session endpoint."""
        ...
