"""One HTTP client per connector: a keep-alive pool per origin, one TLS context, one timeout
model, and one map from transport failures to what went wrong.

The proxy's requests, the token requests (the IdP may be another host: Keycloak, Infor's SSO),
connection tests and ``erp-broker status`` all go through :class:`Client`: every pool of one
connector has its ``SSLContext`` (``ca_file``, ``tls_verify``), its connect and read timeouts
and its keep-alive timeout. A token request to the ERP's own host shares the pool of the
proxied requests, so the connection a login opened carries the first requests after it.

:func:`transport_failure` is the only place where an exception of the transport (TCP, TLS,
HTTP/1.1 framing) is read: it names the phase that failed (``connect``, ``tls``, ``request``,
``response``), the origin and what happened, never a header or a body (they may hold a
secret). Above this floor, each user turns a :class:`Failure` into its own error:
``UpstreamTimeout``/``UpstreamUnreachable`` (the proxy), ``TokenEndpointError`` (token
requests), a probe's message.

:meth:`Client.fetch` is the "whole answer" call for small exchanges (token requests, a check
endpoint): no redirect followed, no cookie, no decompression (nothing asks for it), the body
bounded by ``limit``. It never sends a request twice, so it never rides a pooled connection
that may have gone stale: it opens its own, which joins the pool once the answer is read.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from multidict import CIMultiDictProxy
from yarl import URL

from .http1 import (
    KEEPALIVE_TIMEOUT,
    InvalidHeader,
    Pool,
    PoolTimeout,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReadTimeout,
)

#: The phases of one exchange, as :attr:`Failure.phase` names them.
CONNECT, TLS, REQUEST, RESPONSE = "connect", "tls", "request", "response"
#: Largest body :meth:`Client.fetch` reads by default (a token answer is a few KiB).
MAX_ANSWER = 1024 * 1024
#: Exceptions :func:`transport_failure` knows; anything else is not the transport's.
TRANSPORT_ERRORS = (UpstreamError, InvalidHeader, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Failure:
    """What failed in one exchange: its phase, the origin, what happened, and whether it was
    a timeout. Holds no header, body or query string."""

    phase: str
    origin: str
    what: str
    timeout: bool = False

    def describe(self, subject: str = "") -> str:
        """One line for an operator; ``subject`` names the other end ("the token endpoint")."""
        where = f"{subject} {self.origin}" if subject else self.origin
        if self.phase == CONNECT:
            return (
                f"cannot reach {where} ({self.what}): check domain/base_url and that the host "
                "is reachable"
            )
        if self.phase == TLS:
            return (
                f"TLS error talking to {where} ({self.what}): check ca_file or the server "
                "certificate"
            )
        if self.phase == REQUEST:
            return f"sending the request to {where} failed: {self.what}"
        return f"reading the answer of {where} failed: {self.what}"


class TransportError(Exception):
    """An exchange of :meth:`Client.fetch` failed below HTTP: see :attr:`failure`."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def origin_of(pool: Pool) -> str:
    host = f"[{pool.host}]" if ":" in pool.host else pool.host
    return f"{host}:{pool.port}"


def transport_failure(exc: BaseException, pool: Pool) -> Failure:
    """The one map from a failure of :class:`~broker.http1.Pool` (or of connecting for it)
    to what went wrong: one of :data:`TRANSPORT_ERRORS` in, a :class:`Failure` out."""
    origin = origin_of(pool)
    if isinstance(exc, PoolTimeout):
        return Failure(CONNECT, origin, str(exc), timeout=True)
    if isinstance(exc, UpstreamReadTimeout):
        return Failure(RESPONSE, origin, f"nothing came for {pool.read_timeout:g}s", timeout=True)
    if isinstance(exc, InvalidHeader):
        return Failure(REQUEST, origin, str(exc))
    if isinstance(exc, UpstreamProtocolError):
        return Failure(RESPONSE, origin, f"not valid HTTP/1.1: {exc}")
    if isinstance(exc, UpstreamClosed):
        # Before or after the request was out, the connection ended without a whole answer.
        return Failure(RESPONSE, origin, f"the connection closed ({_cause(exc)})")
    if isinstance(exc, UpstreamError):
        return Failure(CONNECT, origin, str(exc))
    # What ``create_connection`` raises: it resolves, connects and shakes hands within the
    # connect timeout.
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Failure(TLS, origin, exc.verify_message or "certificate verify failed")
    if isinstance(exc, ssl.SSLError):
        return Failure(TLS, origin, exc.reason or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return Failure(
            CONNECT, origin, f"no connection within {pool.connect_timeout:g}s", timeout=True
        )
    if isinstance(exc, ConnectionRefusedError):
        return Failure(CONNECT, origin, "connection refused")
    if isinstance(exc, socket.gaierror):
        return Failure(CONNECT, origin, "the host name does not resolve")
    if isinstance(exc, ConnectionError):
        return Failure(CONNECT, origin, f"{type(exc).__name__}: {exc.strerror or exc}")
    if isinstance(exc, OSError):
        return Failure(CONNECT, origin, exc.strerror or type(exc).__name__)
    return Failure(CONNECT, origin, type(exc).__name__)


def _cause(exc: BaseException) -> str:
    """A pooled connection's closing, shortened: "the ERP closed the connection: X" → "X"."""
    text = str(exc)
    return text.rsplit(": ", 1)[-1] if ": " in text else text


class Answer(NamedTuple):
    """A whole answer of :meth:`Client.fetch`."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


#: Called after each :meth:`Client.fetch`: method, URL without its query, status or failure.
Observer = Callable[[str, str, "int | Failure"], None]


class Client:
    """The pools of one connector, one per origin, with its TLS context and timeouts
    (``ssl_context`` None: plain HTTP only)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        observer: Observer | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.observer = observer
        self._pools: dict[tuple[str, str, int], Pool] = {}

    def pool(self, url: str | URL) -> Pool:
        """The pool to ``url``'s origin (made on first use)."""
        target = url if isinstance(url, URL) else URL(url)
        scheme = target.scheme
        if (
            scheme not in ("http", "https")
            or not target.host
            or (scheme == "https" and self.ssl_context is None)
        ):
            raise ValueError(f"not an http(s) URL with a host: {target.with_query(None)}")
        port = target.port or (443 if scheme == "https" else 80)
        key = (scheme, target.host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                target.host,
                port,
                ssl_context=self.ssl_context if scheme == "https" else None,
                limit=self.limit,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                keepalive_timeout=self.keepalive_timeout,
            )
        return pool

    async def fetch(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        limit: int = MAX_ANSWER,
        encoded: bool = False,
    ) -> Answer:
        """Send one request on a new connection and read its whole answer.

        ``url`` is parsed as aiohttp parses it (``encoded``: taken byte for byte). A body over
        ``limit`` bytes, and any transport failure, raise :class:`TransportError`.
        """
        target = URL(url, encoded=encoded)
        pool = self.pool(target)
        shown = str(target.with_query(None))
        path = target.raw_path_qs
        try:
            try:
                answer = await self._exchange(pool, method, path, headers, body, limit)
            except TRANSPORT_ERRORS as exc:
                raise TransportError(transport_failure(exc, pool)) from None
        except TransportError as exc:
            if self.observer is not None:
                self.observer(method, shown, exc.failure)
            raise
        if self.observer is not None:
            self.observer(method, shown, answer.status)
        return answer

    @staticmethod
    async def _exchange(
        pool: Pool,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        limit: int,
    ) -> Answer:
        response = await pool.request(method, target, headers, body, fresh=True)
        try:
            length = response.content_length
            if length is not None and length > limit and method != "HEAD":
                raise _too_large(pool, limit)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.iter_any():
                size += len(chunk)
                if size > limit:
                    raise _too_large(pool, limit)
                chunks.append(bytes(chunk))
            return Answer(response.status, response.headers, b"".join(chunks))
        finally:
            response.release()  # back to the pool when read to its end, else closed

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _too_large(pool: Pool, limit: int) -> TransportError:
    return TransportError(
        Failure(RESPONSE, origin_of(pool), f"the answer is larger than {limit} bytes")
    )
