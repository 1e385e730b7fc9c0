"""Talking to an ERP straight from the config, without a running broker.

``test-connection`` and the command-line ``discover`` use these: a :class:`~broker.client.Client`
with the connector's ``ca_file``/``tls_verify`` and timeouts exactly as the broker's, and
credentials from a fresh login (never the broker's cached token, so a test proves the
configured secrets work today and touches nothing a running broker holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from .client import Client, Observer
from .config import ConnectorConfig
from .credential import Token
from .errors import TokenEndpointError, TokenError
from .types import Authenticator, Clock
from .upstream import proxy_ssl_context

#: Connections a short-lived client keeps to one origin.
DIRECT_LIMIT = 8


@contextlib.contextmanager
def direct_client(config: ConnectorConfig, *, observer: Observer | None = None) -> Iterator[Client]:
    """A short-lived client to one ERP with the connector's TLS settings and timeouts."""
    client = Client(
        ssl_context=proxy_ssl_context(config),
        limit=DIRECT_LIMIT,
        connect_timeout=config.timeout,
        read_timeout=config.timeout,
        observer=observer,
    )
    try:
        yield client
    finally:
        client.close()


class FreshCredentials:
    """A :class:`~broker.types.CredentialSource` that logs in once, and again after a 401.

    Not a token manager: no store, no background refresh, no single-flight beyond one lock.
    What it obtained is given back by :meth:`close`.
    """

    def __init__(
        self, authenticator: Authenticator, *, timeout: float, clock: Clock = time.time
    ) -> None:
        self.authenticator = authenticator
        self._timeout = timeout
        self._clock = clock
        self._token: Token | None = None
        self._issued: list[Token] = []
        self._lock = asyncio.Lock()

    async def login(self) -> Token:
        """One login, bounded by the connector's token timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                token = await self.authenticator.login()
        except TimeoutError:
            raise TokenEndpointError(
                f"the token endpoint did not answer within {self._timeout:g}s"
            ) from None
        self._issued.append(token)
        self._token = token
        return token

    async def get(self) -> Token:
        async with self._lock:
            token = self._token
            if token is None or token.expired(self._clock()):
                token = await self.login()
            return token

    async def reject(self, token: Token) -> Token:
        async with self._lock:
            if self._token is not None and self._token is not token:
                return self._token
            return await self.login()

    async def close(self) -> None:
        """Revoke what was obtained (best effort): a test leaves no grant behind."""
        for token in self._issued:
            with contextlib.suppress(TokenError, TimeoutError, OSError):
                async with asyncio.timeout(self._timeout):
                    await self.authenticator.revoke(token)
        self._issued.clear()
