"""OAuth2 token requests shared by the Keycloak (IFS) and Infor authenticators.

Only the classification lives here: which answers mean "the credentials are wrong" (terminal),
"the refresh token is dead" (log in again) or "try later" (transient). Retry policy does not:
the token manager owns it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..errors import CredentialsRejected, RefreshRejected, TokenEndpointError
from ..secrets import scrub

REFRESH_GRANT = "refresh_token"


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


async def read_json(response: aiohttp.ClientResponse) -> Any:
    raw = await response.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (aiohttp's BasicAuth is deprecated)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def post_form(
    session: aiohttp.ClientSession,
    url: str,
    form: Mapping[str, str],
    *,
    client: tuple[str, str] | None = None,
) -> tuple[int, Any]:
    """POST a form, returning (status, parsed JSON or None); network errors are transient.

    ``client`` (id, secret) is sent as HTTP Basic authentication.
    """
    headers = {"Accept": "application/json"}
    if client is not None:
        headers["Authorization"] = basic_auth(*client)
    try:
        async with session.post(
            url,
            data=dict(form),
            headers=headers,
            allow_redirects=False,
        ) as response:
            return response.status, await read_json(response)
    except aiohttp.ClientSSLError as exc:
        raise TokenEndpointError(
            f"TLS error talking to the token endpoint ({type(exc).__name__}): check ca_file "
            "or the server certificate"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        target = URL(url)
        raise TokenEndpointError(
            f"cannot reach the token endpoint {target.host}:{target.port} "
            f"({type(exc).__name__}): check domain/base_url and that the host is reachable"
        ) from None


def classify_oauth(
    status: int, body: Any, *, grant: str, credentials_hint: str, client_hint: str
) -> Any:
    """Return the JSON body of a successful answer; raise the right TokenError otherwise."""
    if status == 200:
        if not isinstance(body, dict):
            raise TokenEndpointError("the token endpoint answered 200 without a JSON body")
        return body
    detail = describe(body)
    error = body.get("error") if isinstance(body, dict) else None
    if status == 429 or status >= 500:
        raise TokenEndpointError(f"the token endpoint answered {status} {detail}".rstrip())
    if (
        grant == REFRESH_GRANT
        and status in (400, 401)
        and error
        not in (
            "invalid_client",
            "unauthorized_client",
        )
    ):
        raise RefreshRejected(f"refresh token rejected ({status} {detail})")
    if error in ("invalid_client", "unauthorized_client"):
        raise CredentialsRejected(f"client rejected ({status} {detail}): check {client_hint}")
    if error == "invalid_grant" or status in (400, 401, 403):
        raise CredentialsRejected(
            f"credentials rejected ({status} {detail}): check {credentials_hint}"
        )
    if status == 404:
        raise CredentialsRejected(f"token endpoint not found (404): check {client_hint}")
    raise TokenEndpointError(f"the token endpoint answered {status} {detail}".rstrip())
