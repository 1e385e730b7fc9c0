"""The proxy listener: routing, header filtering, reading the app's body, streaming the answer.

Each request is sent through its connector's send loop (:meth:`Connector.exchange` in
``upstream.py``), which owns the whole retry policy for the proxy and API discovery alike.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote

import structlog
from multidict import CIMultiDict

from .answers import error_answer
from .audit import add_audit_fields, operation_of
from .errors import (
    BadRequest,
    NoRoute,
    ProxyError,
)
from .flow import answer_has_body
from .http1 import Response as Upstream
from .links import LinkRewriter
from .logs import info_line
from .server import BodyReader, Refusal, Request, Response
from .upstream import NO_BODY, Body, Connector, reading

if TYPE_CHECKING:
    from .tracing import RequestTrace, Tracing

log = structlog.get_logger("broker.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Credentials the app may send are never forwarded: the broker's replace them.
CREDENTIAL_HEADERS = frozenset({"authorization", "apikey", "proxy-authorization"})
#: Set by the client library from the URL and the body, not copied.
_REQUEST_DROP = HOP_BY_HOP | CREDENTIAL_HEADERS | {"host", "content-length", "expect"}
#: The answer's framing is the broker's own (one Content-Length, or chunked), never copied.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
_RESPONSE_DROP_WITH_ID = _RESPONSE_DROP | {"x-request-id"}
#: Responses with a Content-Length up to this are read whole and sent in one write.
SMALL_BODY = 64 * 1024
REQUEST_ID = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` gives it, at a
    fifth of the cost: the random bytes are drawn from ``os.urandom`` 256 ids at a time (one
    system call, not one per request)."""
    global _random, _taken
    if _taken >= len(_random):
        _random, _taken = os.urandom(16 * 256), 0
    n = int.from_bytes(_random[_taken : _taken + 16], "big")
    _taken += 16
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # variant: RFC 4122
    n = (n & ~(0xF000 << 64)) | (4 << 76)  # version 4
    return f"{n:032x}"


_random = b""
_taken = 0


def has_dot_segment(path: str) -> bool:
    """True if any segment is ``.`` or ``..`` once decoded, however many times encoded,
    with path parameters too (``..;x``: Tomcat, Jetty and WebLogic take it for ``..``)."""
    if "." not in path and "%" not in path:
        return False  # no dot, and nothing that could decode to one
    for _ in range(4):
        # Backslashes are separators to some servers (IIS); treat them as such.
        for segment in re.split(r"[/\\]", path):
            if segment.partition(";")[0] in (".", ".."):
                return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # still changing after four rounds of decoding: refuse


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, ()))
    value = headers.get(name)
    return [] if value is None else [value]


def _hop_by_hop_named(headers: Iterable[str]) -> set[str]:
    """Headers the ``Connection`` header names are hop-by-hop too."""
    return {name.strip().lower() for value in headers for name in value.split(",") if name.strip()}


@functools.lru_cache(maxsize=64)
def _drop_also(drop: frozenset[str], connection: tuple[str, ...]) -> frozenset[str]:
    # Nearly every message says "keep-alive" or "close": parse each distinct value once.
    return drop | _hop_by_hop_named(connection)


def _without(headers: Mapping[str, str], drop: frozenset[str]) -> list[tuple[str, str]]:
    """``headers`` minus ``drop`` and whatever their ``Connection`` header names (repeats kept)."""
    if "Connection" in headers:
        drop = _drop_also(drop, tuple(_all(headers, "Connection")))
    return [(key, value) for key, value in headers.items() if key.lower() not in drop]


def request_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The app's headers minus hop-by-hop, credential and framing headers (repeats kept)."""
    return CIMultiDict(_without(headers, _REQUEST_DROP))


async def read_body(request: Request, limit: int) -> Body:
    """Buffer up to ``limit`` bytes for replay; stream anything larger."""
    if not request.body_exists:
        return Body(data=None)
    length = request.content_length
    if length is not None and length <= limit:
        return Body(data=await request.read())
    if length is not None:
        return Body(data=None, stream=_iter_content(request.content, b""), length=length)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.readany()
        if not chunk:
            return Body(data=b"".join(chunks))
        chunks.append(chunk)
        size += len(chunk)
    return Body(data=None, stream=_iter_content(request.content, b"".join(chunks)))


async def _iter_content(content: BodyReader, prefix: bytes) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    while chunk := await content.readany():
        yield chunk


class Router:
    """Longest route prefix wins."""

    def __init__(self, connectors: Iterable[Connector]) -> None:
        self._routes = sorted(
            ((c.route, c) for c in connectors), key=lambda item: len(item[0]), reverse=True
        )

    def match(self, path: str) -> tuple[Connector, str] | None:
        for prefix, connector in self._routes:
            if path.startswith(prefix):
                return connector, path[len(prefix) :]
            if path == prefix[:-1]:
                return None  # /ifs is not /ifs/: never forwarded, a 404 no_route
        return None


class Proxy:
    """The request handler of the proxy listener."""

    def __init__(
        self,
        connectors: Iterable[Connector],
        *,
        access_log: bool = True,
        tracer: Tracing | None = None,
    ) -> None:
        self.router = Router(connectors)
        self.access_log = access_log
        #: None unless ``tracing`` is configured; then each hook costs an ``is None`` test.
        self.tracer = tracer
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle(self, request: Request) -> Response | None:
        """Answer one request: a whole :class:`Response`, or None when the answer was
        streamed through ``request`` already."""
        started = time.perf_counter()
        request_id = request.headers.get(REQUEST_ID)
        if request_id is None or not _VALID_REQUEST_ID.fullmatch(request_id):
            request_id = new_request_id()
        trace = None if self.tracer is None else self.tracer.request(request, request_id)
        connector: Connector | None = None
        rest = ""
        error: str | None = None
        attempts = 0
        status = 500
        self.inflight += 1
        self.idle.clear()
        try:
            try:
                connector, rest, query = self._route(request)
                connector.inflight += 1
                if trace is not None:
                    trace.routed(connector, operation_of(connector.odata, rest))
                try:
                    response, status, attempts = await self.forward(
                        request, connector, rest, query, request_id, trace
                    )
                finally:
                    connector.inflight -= 1
            except ProxyError as exc:
                if exc.connector is None and connector is not None:
                    exc.connector = connector.name
                error = exc.code
                attempts = exc.attempts
                log.info(
                    "broker_error",
                    code=exc.code,
                    message=exc.message,
                    connector=exc.connector,
                    request_id=request_id,
                )
                if request.started:
                    # The answer's head is out (the ERP broke off its body): the app learns
                    # of it by the connection closing, which the listener does quietly.
                    status = exc.status
                    raise ConnectionAbortedError(exc.message) from None
                response = error_answer(exc)
                response.headers.append((REQUEST_ID, request_id))
                status = response.status
            return response
        except Refusal as refused:  # the listener refuses the body (stalled: 408)
            status = refused.status
            raise
        finally:
            if request.client_gone:
                status = 499  # nginx's "client closed request": never the broker's error
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
            elapsed = time.perf_counter() - started
            if connector is not None:
                connector.record(request.method, status, elapsed)
            if trace is not None:
                trace.finish(
                    status, attempts, error, connector.credential_id if connector else None
                )
            if self.access_log:
                line = {
                    "connector": connector.name if connector else None,
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "attempts": attempts,
                    "request_id": request_id,
                }
                if connector is not None:
                    # Audit: which ERP operation, with which credential (broker/audit.py).
                    add_audit_fields(
                        line, connector.odata, rest, connector.credential_id if attempts else None
                    )
                info_line(log, "request", line)

    def _route(self, request: Request) -> tuple[Connector, str, str]:
        if request.method == "CONNECT":
            raise BadRequest("CONNECT is refused: erp-broker is not an open proxy")
        target = request.raw_path
        if not target.startswith("/"):
            raise BadRequest(
                "absolute-form request targets are refused: erp-broker is not an open proxy; "
                "send /<route>/<path>"
            )
        path, _, query = target.partition("?")
        if has_dot_segment(path):
            raise BadRequest("paths with '.' or '..' segments are refused")
        match = self.router.match(path)
        if match is None:
            raise NoRoute(f"no connector route matches {request.path[:200]}")
        connector, rest = match
        return connector, rest, query

    async def forward(
        self,
        request: Request,
        connector: Connector,
        rest: str,
        query: str,
        request_id: str,
        trace: RequestTrace | None = None,
    ) -> tuple[Response | None, int, int]:
        """Send the request to the ERP through its connector's send loop
        (:meth:`Connector.exchange`, where every retry is decided), and stream the answer."""
        target = connector.target_for(rest, query)
        headers = request_headers(request.headers)
        headers[REQUEST_ID] = request_id
        if request.body_exists:
            body = await read_body(request, connector.config.replay_max_bytes)
        else:
            body = NO_BODY  # most requests: no coroutine to learn there is nothing to read
        upstream, data, attempts = await connector.exchange(
            request.method, target, headers, body, trace
        )
        answer = await self._stream_back(request, upstream, request_id, connector.links, data)
        return answer, upstream.status, attempts

    @staticmethod
    async def _stream_back(
        request: Request,
        upstream: Upstream,
        request_id: str,
        links: LinkRewriter | None = None,
        data: bytes | None = None,
    ) -> Response | None:
        status = upstream.status
        length = upstream.content_length
        headers = _without(upstream.headers, _RESPONSE_DROP_WITH_ID)
        if length is not None:  # the framing checked by the client, in one header
            headers.append(("Content-Length", str(length)))
        headers.append((REQUEST_ID, request_id))
        # The ERP's URLs in Location (and in JSON bodies) lead back through the broker.
        body_links = (
            links.answer(
                request.headers.get("Host"),
                headers,
                has_body=answer_has_body(request.method, status),
            )
            if links is not None
            else None
        )
        if body_links is not None and body_links.compressed:
            length = None  # inflated as it streams, never whole in memory
        small = (
            length is not None and length <= SMALL_BODY and answer_has_body(request.method, status)
        )
        with reading(upstream):
            if small:
                # A small body of known length: read whole and answered in one write. The
                # headers (Content-Encoding among them) go out as they came, with the
                # broker's own Content-Length. A matcher may have read it already.
                if data is None:
                    data = await upstream.read()
                if body_links is not None:
                    data = body_links.whole(data)  # its new length is the one sent
            else:
                # The length as the ERP announced it; without one (chunked, or until the ERP
                # closed) the body is chunked to the app.
                if body_links is not None:
                    length = None  # rewritten as it streams: chunked
                chunked = request.start(status, upstream.reason, headers, length=length)
                chunks = upstream.iter_any()
                async for chunk in chunks if body_links is None else body_links.stream(chunks):
                    await request.write(chunk, chunked)
                request.write_eof(chunked)
        upstream.release()
        if not small:
            return None
        assert data is not None
        return Response(status, headers, data, upstream.reason)
