"""The broker's exception tree (how each becomes an HTTP answer: :mod:`broker.answers`).

    BrokerError
    ├── ConfigError                 bad configuration: exits 2 before listening
    ├── StoreError                  the token store cannot be opened, read or written
    │   └── EncryptionKeyError      stored tokens were written with another key
    ├── TokenError                  the ERP's token/session endpoint did not give a credential
    │   ├── CredentialsRejected     wrong password / client secret / account id: terminal
    │   ├── RefreshRejected         the refresh token is dead: log in again
    │   └── TokenEndpointError      5xx, timeout, garbage body: transient, retry with backoff
    └── ProxyError                  an answer the broker makes itself (status + JSON body)
        ├── NoRoute                 404 no_route
        ├── BadRequest              400 bad_request
        ├── AuthFailed              502 auth_failed
        ├── UpstreamUnreachable     502 upstream_unreachable
        ├── UpstreamTimeout         504 upstream_timeout
        ├── ConnectorUnavailable    503 connector_unavailable
        ├── RateLimited             429 rate_limited (client-side budget, wait queue full, window
        │                                         longer than the retry budget has left)
        └── DiscoveryFailed         502 discovery_failed (IFS projection list / $openapi)

Messages never contain a secret: they name the setting to check instead. How an error becomes
an HTTP answer is :mod:`broker.answers`' business alone.
"""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(BrokerError):
    """The token store failed."""


class EncryptionKeyError(StoreError):
    """Stored tokens cannot be decrypted with the configured ``encryption_key``."""


class TokenError(BrokerError):
    """The token endpoint did not give a usable credential.

    ``cause`` is the precise reason shown to operators (``/connectors`` ``last_error.cause``,
    ``erp_broker_login_failures_total{cause}``): ``invalid_credentials``, ``account_disabled``,
    ``account_not_set_up``, ``client_not_allowed``, ``invalid_client``, ``refresh_rejected``
    or ``endpoint_error``.
    """

    #: What kind of failure, for logs and ``/connectors`` ("rejected", "transient", ...).
    kind = "error"
    cause = "endpoint_error"

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.cause = cause


class CredentialsRejected(TokenError):
    """The ERP rejected the configured credentials; retrying would only lock the account."""

    kind = "credentials_rejected"
    cause = "invalid_credentials"


class RefreshRejected(TokenError):
    """The refresh token was rejected (expired, used, revoked); a fresh login may still work."""

    kind = "refresh_rejected"
    cause = "refresh_rejected"


class TokenEndpointError(TokenError):
    """A transient failure: 5xx, timeout, connection error, a body without a token."""

    kind = "transient"


class ProxyError(BrokerError):
    """An error the broker answers itself, with ``status`` and a JSON body."""

    status = 500
    code = "internal_error"
    #: Requests sent to the ERP before it happened (the send loop sets it; the access line).
    attempts = 0

    def __init__(self, message: str, *, connector: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.connector = connector


class NoRoute(ProxyError):
    status = 404
    code = "no_route"


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class AuthFailed(ProxyError):
    status = 502
    code = "auth_failed"


class UpstreamUnreachable(ProxyError):
    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class ConnectorUnavailable(ProxyError):
    status = 503
    code = "connector_unavailable"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limited"


class DiscoveryFailed(ProxyError):
    status = 502
    code = "discovery_failed"
