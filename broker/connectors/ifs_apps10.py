"""IFS Applications 10 / IFS Cloud: OAuth2 password grant on Keycloak (IFS IAM)."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

from ..config import IfsApps10Config
from ..tokens import Token, token_from_oauth
from ..types import Clock
from .oauth import REFRESH_GRANT, classify_oauth, post_form


class IfsApps10Authenticator:
    """Password grant, refresh grant while the refresh token lives; Bearer on every call."""

    login_grant = "password"

    def __init__(
        self, config: IfsApps10Config, session: aiohttp.ClientSession, clock: Clock
    ) -> None:
        self._config = config
        self._session = session
        self._clock = clock
        self.token_url = config.resolved_token_url()

    async def _grant(
        self, grant: str, form: dict[str, str], previous: Token | None = None
    ) -> Token:
        config = self._config
        form |= {"client_id": config.client_id, "client_secret": config.client_secret.get()}
        now = self._clock()
        status, body = await post_form(self._session, self.token_url, form)
        body = classify_oauth(
            status,
            body,
            grant=grant,
            credentials_hint="username and password",
            client_hint="client_id, client_secret and realm/token_url",
        )
        return token_from_oauth(
            body,
            grant=grant,
            now=now,
            default_lifetime=config.default_token_lifetime,
            previous=previous,
        )

    async def login(self) -> Token:
        return await self._grant(
            "password",
            {
                "grant_type": "password",
                "username": self._config.username,
                "password": self._config.password.get(),
                "scope": self._config.scope,
            },
        )

    async def refresh(self, token: Token) -> Token:
        assert token.refresh is not None
        return await self._grant(
            REFRESH_GRANT,
            {"grant_type": REFRESH_GRANT, "refresh_token": token.refresh},
            previous=token,
        )

    async def revoke(self, token: Token) -> None:
        """End the Keycloak session (best effort; IFS tokens are short-lived anyway)."""
        if not token.refresh or self._config.token_url:
            return
        logout = self.token_url.rsplit("/", 1)[0] + "/logout"
        await post_form(
            self._session,
            logout,
            {
                "client_id": self._config.client_id,
                "client_secret": self._config.client_secret.get(),
                "refresh_token": token.refresh,
            },
        )

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        headers["Authorization"] = f"Bearer {token.access}"
