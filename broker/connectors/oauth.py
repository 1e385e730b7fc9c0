"""OAuth2 token requests shared by the Keycloak (IFS) and Infor authenticators.

Only the classification lives here: which answers mean "the credentials are wrong" (terminal),
"the refresh token is dead" (log in again) or "try later" (transient). Retry policy does not:
the token manager owns it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from .. import __version__
from ..client import Client, TransportError
from ..credential import Token
from ..errors import CredentialsRejected, RefreshRejected, TokenEndpointError
from ..secrets import scrub

REFRESH_GRANT = "refresh_token"


class OAuthGrants:
    """What every OAuth2 authenticator shares: the refresh_token grant, sent through the
    authenticator's own ``_grant`` (its token endpoint, client authentication and errors)."""

    async def _grant(
        self, grant: str, form: dict[str, str], previous: Token | None = None
    ) -> Token:
        raise NotImplementedError

    async def refresh(self, token: Token) -> Token:
        assert token.refresh is not None
        return await self._grant(
            REFRESH_GRANT,
            {"grant_type": REFRESH_GRANT, "refresh_token": token.refresh},
            previous=token,
        )


def describe(body: Any) -> str:
    """A short, secret-free description of an error body."""
    if isinstance(body, dict):
        parts = [
            str(body[k])
            for k in ("error", "error_description", "Message", "message")
            if body.get(k)
        ]
        text = ": ".join(parts)
    else:
        text = ""
    return scrub(text)[:200]


def parse_json(raw: bytes) -> Any:
    """The JSON of a token answer, or None (empty, or not JSON)."""
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (aiohttp's BasicAuth is deprecated)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


#: Sent with every token request: no compressed answer (nothing inflates it), and a name.
FORM_HEADERS = (
    ("Accept", "application/json"),
    ("Accept-Encoding", "identity"),
    ("Content-Type", "application/x-www-form-urlencoded"),
    ("User-Agent", f"erp-broker/{__version__}"),
)


async def post_form(
    http: Client,
    url: str,
    form: Mapping[str, str],
    *,
    client: tuple[str, str] | None = None,
) -> tuple[int, Any]:
    """POST a form, returning (status, parsed JSON or None); transport failures are transient.

    ``client`` (id, secret) is sent as HTTP Basic authentication. No redirect is followed, no
    cookie kept, and the answer is bounded (:data:`broker.client.MAX_ANSWER`).
    """
    headers = list(FORM_HEADERS)
    if client is not None:
        headers.append(("Authorization", basic_auth(*client)))
    try:
        answer = await http.fetch("POST", url, headers, urlencode(dict(form)).encode("ascii"))
    except TransportError as exc:
        raise TokenEndpointError(exc.failure.describe("the token endpoint")) from None
    return answer.status, parse_json(answer.body)


INVALID_CREDENTIALS = "invalid_credentials"
ACCOUNT_DISABLED = "account_disabled"
ACCOUNT_NOT_SET_UP = "account_not_set_up"
CLIENT_NOT_ALLOWED = "client_not_allowed"
INVALID_CLIENT = "invalid_client"
REFRESH_REJECTED = "refresh_rejected"
ENDPOINT_ERROR = "endpoint_error"
#: Every cause, in the order operators read them (metrics series exist for each from start).
CAUSES = (
    INVALID_CREDENTIALS,
    ACCOUNT_DISABLED,
    ACCOUNT_NOT_SET_UP,
    CLIENT_NOT_ALLOWED,
    INVALID_CLIENT,
    REFRESH_REJECTED,
    ENDPOINT_ERROR,
)


@dataclass(frozen=True, slots=True)
class Hints:
    """What an operator should check for each cause, for one identity provider (names of
    settings and accounts, never a secret)."""

    invalid_credentials: str
    invalid_client: str
    account_disabled: str = "the account is disabled at the identity provider: enable it"
    account_not_set_up: str = (
        "the account has a temporary or expired password or other required actions: set a "
        "permanent password (see the password policy) and clear the required actions"
    )
    client_not_allowed: str = "the client may not use this grant at the identity provider"


def _rejected(cause: str, status: int, detail: str, hint: str) -> CredentialsRejected:
    what = "client rejected" if cause in (INVALID_CLIENT, CLIENT_NOT_ALLOWED) else "login rejected"
    return CredentialsRejected(f"{what} ({status} {detail or 'no detail'}): {hint}", cause=cause)


def classify_oauth(status: int, body: Any, *, grant: str, hints: Hints) -> Any:
    """Return the JSON body of a successful answer; raise the right TokenError otherwise.

    Keycloak's answers (erp-protocols.md): ``invalid_grant`` "Invalid user credentials" (401
    up to 26.5, 400 from 26.6), "Account disabled", "Account is not fully set up";
    ``unauthorized_client`` with 400 for a client not allowed this grant, with 401 for a wrong
    client secret; ``invalid_client``; refresh failures ("Token is not active", "Stale token",
    "Session not active", "Maximum allowed refresh token reuse exceeded") are 400.
    """
    if status == 200:
        if not isinstance(body, dict):
            raise TokenEndpointError("the token endpoint answered 200 without a JSON body")
        return body
    detail = describe(body)
    error = body.get("error") if isinstance(body, dict) else None
    text = str(body.get("error_description", "")).lower() if isinstance(body, dict) else ""
    if status == 429 or status >= 500:
        raise TokenEndpointError(f"the token endpoint answered {status} {detail}".rstrip())
    client_error = error == "invalid_client" or (error == "unauthorized_client" and status == 401)
    if grant == REFRESH_GRANT and status in (400, 401) and not client_error:
        raise RefreshRejected(
            f"refresh token rejected ({status} {detail}): the session ended, expired or the "
            "token was reused (SSO Session Idle/Max, Revoke Refresh Token); logging in again"
        )
    if client_error:
        raise _rejected(INVALID_CLIENT, status, detail, hints.invalid_client)
    if error == "unauthorized_client":
        raise _rejected(CLIENT_NOT_ALLOWED, status, detail, hints.client_not_allowed)
    if "disabled" in text:
        raise _rejected(ACCOUNT_DISABLED, status, detail, hints.account_disabled)
    if "not fully set up" in text:
        raise _rejected(ACCOUNT_NOT_SET_UP, status, detail, hints.account_not_set_up)
    if error == "invalid_grant" or status in (400, 401, 403):
        raise _rejected(INVALID_CREDENTIALS, status, detail, hints.invalid_credentials)
    if status == 404:
        raise CredentialsRejected(
            f"token endpoint not found (404): check {hints.invalid_client}", cause=INVALID_CLIENT
        )
    raise TokenEndpointError(f"the token endpoint answered {status} {detail}".rstrip())
