"""The one place where errors become the proxy listener's HTTP answers: a broker error
(:class:`~broker.errors.ProxyError`) or a request the listener refused itself
(:class:`~broker.server.Refusal`, which speaks HTTP statuses only) becomes a status, the JSON
body ``{"error": {"code", "message", "connector"}}`` and an ``X-Broker-Error`` header.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ProxyError, error_payload
from .server import Refusal, Response

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


def json_response(status: int, payload: Any, headers: list[tuple[str, str]]) -> Response:
    return Response(status, [("Content-Type", "application/json"), *headers], orjson.dumps(payload))


def error_answer(error: ProxyError) -> Response:
    """A broker error as the proxy listener answers it."""
    return json_response(
        error.status,
        error_payload(error.code, error.message, error.connector),
        [("X-Broker-Error", error.code)],
    )


def refusal_answer(refusal: Refusal) -> Response:
    """A request the listener refused, as the proxy listener answers it."""
    code = REFUSAL_CODES.get(refusal.status, "bad_request")
    return json_response(
        refusal.status, error_payload(code, refusal.message), [("X-Broker-Error", code)]
    )
