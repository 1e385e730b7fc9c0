"""A credential as the ERP issued it, and how OAuth2 token responses become one.

Kept apart from the token manager (:mod:`broker.tokens`) so that everything that stores,
presents or parses a credential — stores, connectors, the extension points in
:mod:`broker.types` — depends on this small module only.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import TokenEndpointError
from .secrets import register


@dataclass(frozen=True, slots=True)
class Token:
    """A credential as the ERP issued it. Times are Unix seconds."""

    access: str = field(repr=False)
    obtained_at: float
    expires_at: float | None  # None: no lifetime known (a PSO session lives until rejected)
    grant: str
    refresh: str | None = field(default=None, repr=False)
    refresh_expires_at: float | None = None
    #: Where expires_at came from: "expires_in", "jwt", "default", "session_ttl" or "none".
    lifetime_source: str = "expires_in"

    def __post_init__(self) -> None:
        register(self.access)
        if self.refresh:
            register(self.refresh)
        # It goes into a header of every request: a control character would be a header
        # injection (checked once here, not on every request).
        if not self.access.isprintable():
            raise TokenEndpointError(
                "the token endpoint issued an access token holding control characters; refused"
            )

    def expired(self, now: float) -> bool:
        """True once the token is too close to its expiry to be sent."""
        if self.expires_at is None:
            return False
        lifetime = max(0.0, self.expires_at - self.obtained_at)
        return now >= self.expires_at - min(5.0, 0.1 * lifetime)

    def refresh_usable(self, now: float) -> bool:
        if not self.refresh:
            return False
        return self.refresh_expires_at is None or now < self.refresh_expires_at - 1.0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "access": self.access,
                "refresh": self.refresh,
                "obtained_at": self.obtained_at,
                "expires_at": self.expires_at,
                "refresh_expires_at": self.refresh_expires_at,
                "grant": self.grant,
                "lifetime_source": self.lifetime_source,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Token:
        raw = orjson.loads(data)
        return cls(
            access=raw["access"],
            refresh=raw.get("refresh"),
            obtained_at=float(raw["obtained_at"]),
            expires_at=raw.get("expires_at"),
            refresh_expires_at=raw.get("refresh_expires_at"),
            grant=raw.get("grant", "password"),
            lifetime_source=raw.get("lifetime_source", "expires_in"),
        )


def jwt_expiry(value: str) -> float | None:
    """The ``exp`` claim of a JWT-shaped token, without verifying it (we are not the audience)."""
    parts = value.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, orjson.JSONDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def token_from_oauth(
    body: Any, *, grant: str, now: float, default_lifetime: float, previous: Token | None = None
) -> Token:
    """Build a Token from an OAuth2 token response; raise TokenEndpointError if it has none.

    Lifetime comes from ``expires_in``, else the JWT ``exp``, else ``default_lifetime``. A
    refresh response without a refresh token keeps the previous one (no rotation).
    """
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise TokenEndpointError("the token endpoint answered without an access_token")
    access: str = body["access_token"]
    if not access:
        raise TokenEndpointError("the token endpoint answered with an empty access_token")
    expires_in = body.get("expires_in")
    source = "expires_in"
    expires_at: float | None
    if isinstance(expires_in, int | float | str) and str(expires_in).replace(".", "", 1).isdigit():
        expires_at = now + float(expires_in)
    elif (exp := jwt_expiry(access)) is not None:
        expires_at, source = exp, "jwt"
    else:
        expires_at, source = now + default_lifetime, "default"
    refresh = body.get("refresh_token")
    refresh_expires_at: float | None = None
    if isinstance(refresh, str) and refresh:
        refresh_in = body.get("refresh_expires_in")
        if isinstance(refresh_in, int | float) and refresh_in > 0:
            refresh_expires_at = now + float(refresh_in)
    elif previous is not None and previous.refresh:
        refresh, refresh_expires_at = previous.refresh, previous.refresh_expires_at
    else:
        refresh = None
    return Token(
        access=access,
        obtained_at=now,
        expires_at=expires_at,
        grant=grant,
        refresh=refresh,
        refresh_expires_at=refresh_expires_at,
        lifetime_source=source,
    )
