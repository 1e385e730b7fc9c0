"""The one place where errors become HTTP answers: a broker error
(:class:`~broker.errors.ProxyError`), a request a listener refused itself
(:class:`~broker.server.Refusal`, which speaks HTTP statuses only) or an admin request with no
endpoint becomes a status, the JSON body ``{"error": {"code", "message", "connector"}}`` and an
``X-Broker-Error`` header, as a :class:`~broker.server.Response` on either listener. The status
page's refusals (another origin; a guard or lookup that failed, shown on the page itself) are
made here too.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ProxyError
from .server import Refusal, Response

#: The header that names the code of every error the broker answers itself.
ERROR_HEADER = "X-Broker-Error"

#: The code of each status the listener refuses a request with (README, "Errors the broker
#: makes").
REFUSAL_CODES = {
    400: "bad_request",
    408: "request_timeout",
    414: "uri_too_long",
    431: "header_too_large",
    500: "internal_error",
    501: "not_implemented",
    505: "http_version_not_supported",
}


def error_payload(code: str, message: str, connector: str | None = None) -> dict[str, Any]:
    """The JSON body of every error the broker answers itself."""
    return {"error": {"code": code, "message": message, "connector": connector}}


def json_response(status: int, payload: Any, headers: list[tuple[str, str]]) -> Response:
    return Response(status, [("Content-Type", "application/json"), *headers], orjson.dumps(payload))


def error_answer(error: ProxyError) -> Response:
    """A broker error as the proxy listener answers it."""
    return json_response(
        error.status,
        error_payload(error.code, error.message, error.connector),
        [(ERROR_HEADER, error.code)],
    )


def refusal_answer(refusal: Refusal) -> Response:
    """A request the listener refused, as the proxy listener answers it."""
    code = REFUSAL_CODES.get(refusal.status, "bad_request")
    return json_response(
        refusal.status, error_payload(code, refusal.message), [(ERROR_HEADER, code)]
    )


def admin_answer(
    status: int,
    code: str,
    message: str,
    connector: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error as the admin listener answers it."""
    return json_response(
        status,
        error_payload(code, message, connector),
        [(ERROR_HEADER, code), *(headers or {}).items()],
    )


def admin_error(error: ProxyError) -> Response:
    """A broker error as the admin listener answers it."""
    return admin_answer(error.status, error.code, error.message, error.connector)


def page_error(error: ProxyError, page: str, headers: dict[str, str]) -> Response:
    """A broker error on the status page (an action's guard refused, no such connector): the
    error's status, and the page itself, whose banner tells the error (a person reads it)."""
    return Response(
        error.status,
        [*headers.items(), ("Content-Type", "text/html; charset=utf-8")],
        page.encode(),
    )


def page_refusal(reason: str, headers: dict[str, str]) -> Response:
    """A status page action that another origin's page sent: 403, in plain text (nothing of
    the page for another site to show)."""
    return Response(
        403,
        [*headers.items(), ("Content-Type", "text/plain; charset=utf-8")],
        f"refused: {reason}\n".encode(),
    )
