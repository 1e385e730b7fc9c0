"""Talking to an ERP straight from the config, without a running broker.

``test-connection`` and the command-line ``discover`` use these: an HTTP session that honours
the connector's ``ca_file``/``tls_verify`` exactly as the broker's does, and credentials from a
fresh login (never the broker's cached token, so a test proves the configured secrets work
today and touches nothing a running broker holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp

from .config import ConnectorConfig
from .credential import Token
from .errors import TokenEndpointError, TokenError
from .types import Authenticator, Clock
from .upstream import ssl_context


@contextlib.asynccontextmanager
async def direct_session(
    config: ConnectorConfig, *, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """A short-lived session to one ERP with the connector's TLS settings and timeout."""
    session = aiohttp.ClientSession(
        trace_configs=trace_configs,
        connector=aiohttp.TCPConnector(ssl=ssl_context(config)),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout, sock_read=config.timeout
        ),
    )
    try:
        yield session
    finally:
        await session.close()


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
            with contextlib.suppress(TokenError, TimeoutError, OSError, aiohttp.ClientError):
                async with asyncio.timeout(self._timeout):
                    await self.authenticator.revoke(token)
        self._issued.clear()
