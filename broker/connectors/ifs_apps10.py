"""IFS Applications 10 / IFS Cloud: OAuth2 on Keycloak (IFS IAM) or the native Apps 10 provider.

``auth`` chooses how: ``password`` (the resource-owner password grant; refresh grant while the
refresh token lives), ``client_credentials`` (IFS Cloud's recommended grant for integrations:
no refresh token, a new token ahead of expiry) or ``basic`` (HTTP Basic on every request, for
the Apps 10 integration cluster; no token endpoint). ``token_params`` adds form fields to every
token request (the native provider's ``resource``); ``inject: id_token`` sends the ID token as
the Bearer, for installations that accept only that.
"""

from __future__ import annotations

import dataclasses

from multidict import CIMultiDict

from ..client import Client
from ..config import IfsApps10Config
from ..credential import Token, token_from_oauth
from ..errors import TokenEndpointError
from ..types import Clock
from .oauth import Hints, OAuthGrants, basic_auth, classify_oauth, post_form

BASIC_GRANT = "basic"


def keycloak_hints(config: IfsApps10Config) -> Hints:
    """What to check per failure cause, naming this connector's settings and accounts."""
    where = f"realm {config.realm}" if config.realm else "the token_url's provider"
    user = config.username or "the service user"
    client = config.client_id or "the client"
    return Hints(
        invalid_credentials=(
            f"check username and password (user {user}); if they are right, Keycloak's "
            f"brute-force detection may have locked the user: see {where} → Users → {user} "
            "and Realm settings → Security defenses"
        ),
        invalid_client=(
            f"check client_id, client_secret and realm/token_url (client {client} in {where}; "
            "is it enabled?)"
        ),
        account_disabled=(
            f"user {user} is disabled in {where} (or permanently locked by brute-force "
            "detection): enable it under Users"
        ),
        account_not_set_up=(
            f"user {user} has required actions in {where} (a temporary or expired password "
            "under the realm's password policy): set a permanent password and clear them"
        ),
        client_not_allowed=(
            f"client {client} in {where} may not use this grant: turn on 'Direct access "
            "grants' for auth: password, or 'Service accounts' for auth: client_credentials"
        ),
    )


class IfsApps10Authenticator(OAuthGrants):
    """Keycloak or native provider grants, or HTTP Basic; the credential on every call."""

    def __init__(self, config: IfsApps10Config, http: Client, clock: Clock) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        self.token_url = config.resolved_token_url() if config.auth != BASIC_GRANT else ""
        self.login_grant = {"password": "password", "client_credentials": "client_credentials"}.get(
            config.auth, BASIC_GRANT
        )
        self._hints = keycloak_hints(config)

    async def _grant(
        self, grant: str, form: dict[str, str], previous: Token | None = None
    ) -> Token:
        config = self._config
        assert config.client_id is not None and config.client_secret is not None
        form = {**form, **config.token_params}
        form |= {"client_id": config.client_id, "client_secret": config.client_secret.get()}
        now = self._clock()
        status, body = await post_form(self._http, self.token_url, form)
        body = classify_oauth(status, body, grant=grant, hints=self._hints)
        token = token_from_oauth(
            body,
            grant=grant,
            now=now,
            default_lifetime=config.default_token_lifetime,
            previous=previous,
        )
        if config.inject == "id_token":
            id_token = body.get("id_token")
            if not isinstance(id_token, str) or not id_token:
                raise TokenEndpointError(
                    "inject is id_token but the token endpoint answered without an id_token: "
                    "add openid to scope"
                )
            token = dataclasses.replace(token, access=id_token)
        return token

    async def login(self) -> Token:
        config = self._config
        if config.auth == BASIC_GRANT:
            assert config.username is not None and config.password is not None
            return Token(
                access=basic_auth(config.username, config.password.get()),
                obtained_at=self._clock(),
                expires_at=None,
                grant=BASIC_GRANT,
                lifetime_source="none",
            )
        if config.auth == "client_credentials":
            return await self._grant(
                "client_credentials", {"grant_type": "client_credentials", "scope": config.scope}
            )
        assert config.username is not None and config.password is not None
        return await self._grant(
            "password",
            {
                "grant_type": "password",
                "username": config.username,
                "password": config.password.get(),
                "scope": config.scope,
            },
        )

    async def revoke(self, token: Token) -> None:
        """End the Keycloak session (best effort; IFS tokens are short-lived anyway)."""
        config = self._config
        if not token.refresh or config.token_url or config.auth != "password":
            return
        assert config.client_id is not None and config.client_secret is not None
        logout = self.token_url.rsplit("/", 1)[0] + "/logout"
        await post_form(
            self._http,
            logout,
            {
                "client_id": config.client_id,
                "client_secret": config.client_secret.get(),
                "refresh_token": token.refresh,
            },
        )

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        if token.grant == BASIC_GRANT:
            headers["Authorization"] = token.access  # "Basic …", built at login
        else:
            headers["Authorization"] = f"Bearer {token.access}"
