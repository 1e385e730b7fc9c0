"""Infor ION API Gateway: OAuth2 password grant with the service-account keys of a ``.ionapi``.

The client (``ci``/``cs``) authenticates with HTTP Basic on every call to the authorization
server; the user is the service account (``saak``/``sask``). Refresh tokens roll over: the
token manager persists the new one before the new access token is used, so an old one is
never sent again. On shutdown the grant is given back at ``pu`` + ``or``.
"""

from __future__ import annotations

from multidict import CIMultiDict

from ..client import Client
from ..config import InforIonConfig
from ..credential import Token, token_from_oauth
from ..errors import TokenEndpointError
from ..types import Clock
from .oauth import Hints, OAuthGrants, classify_oauth, describe, post_form

HINTS = Hints(
    invalid_credentials=(
        "check the .ionapi file's saak/sask (service-account keys; regenerate them in ION API "
        "if the service account was deleted or its keys revoked)"
    ),
    invalid_client="check the .ionapi file's ci/cs (client id and secret; is the app enabled?)",
    account_disabled="the service account is disabled in Infor OS: check its user and saak/sask",
    client_not_allowed="the ION API app may not use the password grant: check its type",
)


class InforIonAuthenticator(OAuthGrants):
    """Password grant with saak/sask, rotating refresh grant, revocation; Bearer on every call."""

    login_grant = "password"

    def __init__(self, config: InforIonConfig, http: Client, clock: Clock) -> None:
        self._config = config
        self._http = http
        self._clock = clock
        ion = config.ion
        self.token_url = ion.token_url()
        self.revoke_url = ion.revoke_url()

    @property
    def _client(self) -> tuple[str, str]:
        ion = self._config.ion
        return ion.ci, ion.cs.get()

    async def _grant(
        self, grant: str, form: dict[str, str], previous: Token | None = None
    ) -> Token:
        now = self._clock()
        status, body = await post_form(self._http, self.token_url, form, client=self._client)
        body = classify_oauth(status, body, grant=grant, hints=HINTS)
        return token_from_oauth(
            body,
            grant=grant,
            now=now,
            default_lifetime=self._config.default_token_lifetime,
            previous=previous,
        )

    async def login(self) -> Token:
        ion = self._config.ion
        return await self._grant(
            "password",
            {"grant_type": "password", "username": ion.saak.get(), "password": ion.sask.get()},
        )

    async def revoke(self, token: Token) -> None:
        """Revoke the refresh grant (or the lone access token when there is no grant)."""
        if token.refresh:
            form = {"token": token.refresh, "token_type_hint": "refresh_token"}
        else:
            form = {"token": token.access, "token_type_hint": "access_token"}
        status, body = await post_form(self._http, self.revoke_url, form, client=self._client)
        if status != 200:
            raise TokenEndpointError(
                f"the revocation endpoint answered {status} {describe(body)}".rstrip()
            )

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        headers["Authorization"] = f"Bearer {token.access}"
