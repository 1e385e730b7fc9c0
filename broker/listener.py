"""The proxy listener's HTTP server: aiohttp's low-level server with the broker's error answers.

aiohttp's parser (llhttp) already refuses request smuggling inputs — conflicting
``Content-Length``/``Transfer-Encoding``, obs-fold, CR/LF or NUL in header values, bare LF —
before any handler runs, so none of them can reach an ERP. This module only makes those
refusals look like every other broker error (JSON body, ``X-Broker-Error``), gives the size
limits their proper statuses (414 for a long request line, 431 for header fields), and logs
them as one redacted line instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

log = structlog.get_logger("broker.listener")

#: aiohttp's defaults, made explicit: the request line and each header field.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190


def _classify(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """(status, code, message) for an error the handler never saw."""
    if isinstance(exc, LineTooLong):
        # The parser echoes what was too long: the request target starts with "/" or a
        # scheme, a header value does not.
        text = str(getattr(exc, "message", ""))
        echoed = text.partition("reading:")[2].strip().removeprefix("bytearray(")
        echoed = echoed.removeprefix("b").lstrip("'\"")
        if echoed.startswith(("/", "http:", "https:", "*")):
            return 414, "uri_too_long", f"the request line is longer than {MAX_LINE_SIZE} bytes"
        return 431, "header_too_large", f"a header field is longer than {MAX_FIELD_SIZE} bytes"
    if isinstance(exc, BadHttpMessage):
        first = str(getattr(exc, "message", "")).split(":", 1)[0].split("\n", 1)[0]
        if first.startswith("Too many headers"):
            return 431, "header_too_large", "too many header fields"
        return 400, "bad_request", f"malformed HTTP request ({first[:80]})"
    if isinstance(exc, HttpProcessingError):
        return exc.code or 400, "bad_request", "malformed HTTP request"
    if status >= 500:
        return 500, "internal_error", "the broker failed to handle this request"
    return status, "bad_request", "malformed HTTP request"


class _Handler(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, code, text = _classify(exc, status)
        if status >= 500:
            log.error("handler_failed", error=repr(exc), exc_info=exc)
        else:
            log.info("request_refused", status=status, code=code, message=text)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; closing the connection")
        body = {"error": {"code": code, "message": text, "connector": None}}
        response = web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"X-Broker-Error": code},
        )
        response.force_close()
        return response


class ProxyServer(web.Server):
    """``web.Server`` whose connections answer parse errors the broker's way."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_LINE_SIZE)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        super().__init__(handler, **kwargs)

    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)
