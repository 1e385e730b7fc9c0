"""The admin listener's requests and routes: what the admin API's and the status page's
handlers see of a request, and the table that finds a path's handler.

The admin listener is the proxy listener's own :class:`~broker.server.Server` (a second
instance, on ``admin_listen``): a request arrives as :class:`~broker.server.Request` and is
handed to a handler as an :class:`AdminRequest`, with its path's parameters, its query, the
client's address and, for a form post, the form. Paths are matched segment by segment, each
percent-decoded, a ``{name}`` segment matching any one non-empty segment; HEAD goes wherever
GET goes (aiohttp's routing, which the admin listener had before).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

from .errors import BadRequest
from .server import Response

if TYPE_CHECKING:
    from .runtime import Served

#: The most of a form's body that is read (the status page's forms are a few dozen bytes).
MAX_FORM = 64 * 1024
#: The only form encoding the status page's forms use (a ``<form>`` without ``enctype``).
FORM_TYPE = "application/x-www-form-urlencoded"


class Body(Protocol):
    async def readany(self) -> bytes: ...


def _parse_qs(text: str) -> MultiDictProxy[str]:
    return MultiDictProxy(MultiDict(parse_qsl(text, keep_blank_values=True)))


class AdminRequest:
    """One request to the admin listener, as its handlers see it."""

    __slots__ = (
        "_body",
        "headers",
        "match_info",
        "method",
        "path",
        "query",
        "remote",
        "served",
        "target",
    )

    #: The admin listener speaks plain HTTP.
    scheme = "http"

    def __init__(
        self,
        served: Served,
        method: str,
        target: str,
        headers: CIMultiDictProxy[str],
        remote: str | None,
        *,
        body: Body | None = None,
        match_info: dict[str, str] | None = None,
    ) -> None:
        self.served = served
        self.method = method
        #: The request target as sent: path and query, still encoded.
        self.target = target
        raw, _, query = target.partition("?")
        #: The path, percent-decoded.
        self.path = unquote(raw)
        self.query = _parse_qs(query)
        self.headers = headers
        #: The client's address (for the loopback-only guard).
        self.remote = remote
        #: The path's ``{parameters}``, decoded.
        self.match_info = match_info or {}
        self._body = body

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    async def form(self) -> MultiDictProxy[str]:
        """The fields of a form post (URL-encoded); none for a body of another type."""
        kind = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if self._body is None or kind != FORM_TYPE:
            return _parse_qs("")
        data = bytearray()
        while chunk := await self._body.readany():
            data += chunk
            if len(data) > MAX_FORM:
                raise BadRequest(f"a form over {MAX_FORM} bytes")
        return _parse_qs(data.decode("utf-8", "replace"))


Handler = Callable[[AdminRequest], Awaitable[Response]]
#: Something that runs while the listener serves (entered at start, left at shutdown).
Background = Callable[[], AbstractAsyncContextManager[None]]


class Router:
    """Paths and methods to handlers."""

    def __init__(self) -> None:
        self._routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = []
        #: What runs beside the handlers while the listener serves.
        self.background: list[Background] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        pattern = tuple(path.split("/")[1:])
        methods = next((m for p, m in self._routes if p == pattern), None)
        if methods is None:
            methods = {}
            self._routes.append((pattern, methods))
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def add_get(self, path: str, handler: Handler) -> None:
        self.add("GET", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add("POST", path, handler)

    def resolve(self, target: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        """The handlers (by method) of the route a request target's path matches, and the
        path's parameters; None if no route matches."""
        raw = target.partition("?")[0]
        if not raw.startswith("/"):
            return None
        segments = [unquote(s) for s in raw.split("/")[1:]]
        for pattern, methods in self._routes:
            params = _match(pattern, segments)
            if params is not None:
                return methods, params
        return None


def _match(pattern: tuple[str, ...], segments: Iterable[str]) -> dict[str, str] | None:
    parts = list(segments)
    if len(parts) != len(pattern):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
