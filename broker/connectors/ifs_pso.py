"""IFS PSO Scheduling RESTful Gateway: a session login; the session token travels as ``apiKey``.

PSO gives no lifetime and no refresh grant: a session is kept until the Gateway refuses it
(the proxy's 401 path then logs in once more and replays), or renewed ahead of a configured
``session_ttl``. Logout is undocumented, so nothing is revoked.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from ..client import Client
from ..config import IfsPsoConfig
from ..credential import Token
from ..errors import CredentialsRejected, TokenEndpointError
from ..types import Clock
from .oauth import describe, post_form

#: The Gateway's answer to a wrong password, user name or account id.
AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"
CREDENTIALS_HINT = "check account_id, username and password (a wrong account_id fails every login)"


def session_token(body: Any) -> str | None:
    """``SessionToken`` from the login answer (key case ignored; a bare JSON string accepted)."""
    if isinstance(body, str):
        return body or None
    if isinstance(body, dict):
        for key, value in body.items():
            if key.lower() == "sessiontoken" and isinstance(value, str) and value:
                return value
    return None


def classify_login(status: int, body: Any) -> str:
    """The session token of a successful login; raise the right TokenError otherwise."""
    if status == 200:
        token = session_token(body)
        if token is None:
            raise TokenEndpointError("the PSO session endpoint answered 200 without a SessionToken")
        return token
    detail = describe(body)
    message = body.get("Message") if isinstance(body, dict) else None
    if status == 429 or status >= 500:
        raise TokenEndpointError(f"the PSO session endpoint answered {status} {detail}".rstrip())
    if message == AUTHENTICATION_FAILED or status in (400, 401, 403):
        raise CredentialsRejected(
            f"PSO rejected the login ({status} {detail or 'no detail'}): {CREDENTIALS_HINT}"
        )
    if status == 404:
        raise CredentialsRejected(
            "the PSO session endpoint was not found (404): check domain/base_url and session_path"
        )
    raise TokenEndpointError(f"the PSO session endpoint answered {status} {detail}".rstrip())


class IfsPsoAuthenticator:
    """Session login with ``accountId``/``userName``/``password``; ``apiKey`` on every call."""

    login_grant = "session"

    def __init__(self, config: IfsPsoConfig, http: Client, clock: Clock) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        self.session_url = config.session_url()

    async def login(self) -> Token:
        config = self._config
        now = self._clock()
        # In the body, never the query string: the Gateway refuses that since 6.11.
        status, body = await post_form(
            self._http,
            self.session_url,
            {
                "accountId": config.account_id,
                "userName": config.username,
                "password": config.password.get(),
            },
        )
        access = classify_login(status, body)
        if config.session_ttl is not None:
            return Token(
                access=access,
                obtained_at=now,
                expires_at=now + config.session_ttl,
                grant=self.login_grant,
                lifetime_source="session_ttl",
            )
        return Token(
            access=access,
            obtained_at=now,
            expires_at=None,
            grant=self.login_grant,
            lifetime_source="none",
        )

    async def refresh(self, token: Token) -> Token:
        """PSO has no refresh grant: a new session."""
        return await self.login()

    async def revoke(self, token: Token) -> None:
        """Nothing to do: PSO documents no logout, and sessions are not a long-lived grant."""

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        headers["apiKey"] = token.access
