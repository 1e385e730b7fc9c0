"""What every ERP simulator shares: lifecycle, records, issued tokens, fault switches, test routes.

A simulator is a real aiohttp server on loopback. Each subclass adds its ERP's own routes and
wraps them with :meth:`Simulator.token_route` (credential endpoints: recorded in
``token_requests``) or :meth:`Simulator.api_route` (calls that need a live credential: recorded
in ``api_requests``). The wrappers own the fault switches, so every ERP gets them the same way.

Order of checks on an API call: queued response (``queue_api_response``) → credential check
(401 in the ERP's own shape) → the subclass's gate (Infor's quota and 403s) → the handler.
The request body is always read to the end first (hashed incrementally; at most
``record_body_limit`` bytes are kept), so a rejected upload still sees its body drained.

Routes every simulator serves besides its ERP routes:

Control (no auth, not recorded)::

    POST /_sandbox/queue           {"target": "api"|"token", "status": int,
                                    "headers": {...} | [[name, value], ...], "body": str | JSON,
                                    "count": int, "delay": float}
    POST /_sandbox/expire          every access token / session issued so far dies
    POST /_sandbox/revoke-refresh  every refresh token issued so far dies
    POST /_sandbox/credentials     {"password": "new", ...}: set attributes named in ``settable``
    POST /_sandbox/switches        the same (switches and credentials are both ``settable``);
                                   also as a query: ``?brute_force=true&failure_factor=5``
    POST /_sandbox/clock           {"advance": seconds}: the simulator's clock jumps ahead, so
                                   day-long lifetimes (Infor's 30-day grants) pass in a test
    GET  /_sandbox/state           counts: token requests by grant, API requests, revocations

Test routes, behind the simulator's own credential check, under every prefix in
``test_prefixes`` (``""`` for all; Infor also ``/<tenant>``)::

    *        /_test/echo{tail}       200 {"method", "raw_path", "headers": [[k, v], ...],
                                          "body_length", "body_sha256", "credential"}
    GET      /_test/gzip             gzip body, Content-Encoding: gzip, X-Uncompressed-SHA256,
                                     X-Compressed-SHA256
    GET      /_test/bytes/{n}        n bytes of :func:`pattern_chunks`, with Content-Length
    GET      /_test/chunked/{n}      the same, chunked transfer encoding
    GET      /_test/broken/{n}       Content-Length n, then half of it and the connection closed
    POST|PUT /_test/upload           {"length", "sha256"} of the body, hashed as it streams
    GET      /_test/cookies          two Set-Cookie headers
    GET      /_test/redirect         302, Location: /elsewhere
    GET      /_test/slow/{seconds}   200 after sleeping min(seconds, 120)
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import gzip
import hashlib
import math
import secrets
import ssl
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import orjson
from aiohttp import web
from multidict import CIMultiDict

JSON = dict[str, Any]
HeadersLike = Mapping[str, str] | Sequence[tuple[str, str]] | None
BodyLike = bytes | str | Mapping[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Validator = Callable[[Any], Any]

CHUNK_SIZE = 64 * 1024
DEFAULT_RECORD_BODY_LIMIT = 64 * 1024
MAX_SLOW_SECONDS = 120.0
#: Recorded status of a call whose client hung up first (nginx's 499).
CLIENT_CLOSED = 499
#: Credential kinds an API call may carry (refresh tokens are not API credentials).
API_KINDS = frozenset({"access", "session"})

_PATTERN_BLOCK = bytes(range(256)) * (CHUNK_SIZE // 256)
_GZIP_PLAIN = orjson.dumps(
    {"compressed": True, "items": [{"n": n, "text": "sandbox " * 8} for n in range(64)]}
)
_GZIP_BODY = gzip.compress(_GZIP_PLAIN, mtime=0)


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One call to a credential endpoint (token, session login, revoke, logout).

    ``status`` is what the simulator answered, or 499 when the client hung up first.
    """

    time: float
    grant: str
    form: dict[str, str]
    headers: CIMultiDict[str]
    status: int


@dataclass(frozen=True, slots=True)
class ApiRecord:
    """One API call; ``body`` holds at most ``record_body_limit`` bytes of it.

    ``status`` is what the simulator answered, or 499 when the client hung up first.
    """

    time: float
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes
    credential: str | None
    status: int
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class ApiCall:
    """What the API wrapper learnt about a request before the handler runs."""

    credential: str | None
    body: bytes
    body_length: int
    body_sha256: str


@dataclass(frozen=True, slots=True)
class TokenCall:
    """A credential-endpoint request: its form (empty unless form-encoded) and Basic auth."""

    form: dict[str, str]
    is_form: bool
    basic: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class CannedResponse:
    """A queued answer that replaces the simulator's own."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay: float = 0.0

    @classmethod
    def build(
        cls, status: int, headers: HeadersLike, body: BodyLike, delay: float = 0.0
    ) -> CannedResponse:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        content_type: str | None
        if isinstance(body, bytes | bytearray):
            data, content_type = bytes(body), None
        elif isinstance(body, str):
            data, content_type = body.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = orjson.dumps(body), "application/json"
        if content_type and data and not any(k.lower() == "content-type" for k, _ in pairs):
            pairs.append(("Content-Type", content_type))
        return cls(status, tuple(pairs), data, delay)

    def response(self) -> web.Response:
        return web.Response(status=self.status, headers=CIMultiDict(self.headers), body=self.body)


@dataclass(slots=True)
class IssuedToken:
    """A credential the simulator handed out; ``grant_id`` ties a grant's tokens together."""

    kind: Literal["access", "refresh", "session"]
    grant_id: str
    subject: str
    expires_at: float | None
    alive: bool = True
    data: dict[str, Any] = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200, headers: HeadersLike = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        headers=CIMultiDict(headers or ()),
        content_type="application/json",
    )


def token_response(data: Mapping[str, Any]) -> web.Response:
    """A successful OAuth2 token response (RFC 6749 §5.1: never cached)."""
    return json_response(data, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def oauth_error(status: int, error: str, description: str | None = None) -> web.Response:
    """An OAuth2 error response (RFC 6749 §5.2)."""
    body = (
        {"error": error}
        if description is None
        else {"error": error, "error_description": description}
    )
    return json_response(body, status, {"Cache-Control": "no-store", "Pragma": "no-cache"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(claims: Mapping[str, Any]) -> str:
    """A JWT-shaped, unguessable token: real header and payload, random signature."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "sandbox"}
    payload = {**claims, "jti": secrets.token_urlsafe(16)}
    return ".".join(
        (_b64url(orjson.dumps(header)), _b64url(orjson.dumps(payload)), secrets.token_urlsafe(64))
    )


def jwt_claims(token: str) -> JSON:
    """Decode a token's payload (no verification): for tests and for simulators' own use."""
    payload = token.split(".")[1]
    decoded: JSON = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def pattern_chunks(n: int) -> Iterator[bytes]:
    """The deterministic body of ``/_test/bytes/{n}``: byte ``i`` is ``i % 256``."""
    full, rest = divmod(n, CHUNK_SIZE)
    for _ in range(full):
        yield _PATTERN_BLOCK
    if rest:
        yield _PATTERN_BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


def _loose(text: str) -> Any:
    """A query-string value as JSON if it is JSON (``true``, ``400``), else the text."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


def as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    return float(value)


def optional(validate: Validator) -> Validator:
    def check(value: Any) -> Any:
        return None if value is None else validate(value)

    return check


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def host_for_url(host: str, tls: bool) -> str:
    if tls:
        return "localhost"  # what trustme certificates name
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# -- the simulator -------------------------------------------------------------------------


class Simulator(abc.ABC):
    """Base of the ERP simulators; see the module docstring for the shared routes."""

    #: Attributes ``POST /_sandbox/credentials`` may set, with their validators.
    settable: ClassVar[Mapping[str, Validator]] = {
        "token_delay": as_float,
        "record_body_limit": as_int,
    }

    def __init__(self) -> None:
        self.url = ""
        self.token_requests: list[TokenRecord] = []
        self.api_requests: list[ApiRecord] = []
        #: Tokens given back by the client (revoke / logout), in order.
        self.revocations: list[str] = []
        #: Every token request sleeps this long first (a slow IdP).
        self.token_delay = 0.0
        self.record_body_limit = DEFAULT_RECORD_BODY_LIMIT
        #: Seconds the simulator's clock runs ahead of the real one (``/_sandbox/clock``).
        self.clock_offset = 0.0
        #: Monotonic seconds for records and token expiry; tests may replace it.
        self.clock: Callable[[], float] = self._offset_clock
        self._issued: dict[str, IssuedToken] = {}
        self._api_queue: deque[CannedResponse] = deque()
        self._token_queue: deque[CannedResponse] = deque()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    def set_switches(self, switches: Mapping[str, Any]) -> None:
        """Set ``settable`` attributes (constructor keywords and ``/_sandbox/switches``)."""
        for name, value in switches.items():
            if name not in self.settable:
                raise TypeError(f"{type(self).__name__} has no switch {name!r}")
            setattr(self, name, self.settable[name](value))

    def _offset_clock(self) -> float:
        return time.monotonic() + self.clock_offset

    def wall(self) -> float:
        """Unix time as the simulator sees it (the real one plus ``clock_offset``)."""
        return time.time() + self.clock_offset

    def advance(self, seconds: float) -> None:
        """Move the simulator's clock ahead: lifetimes and idle timeouts pass at once."""
        self.clock_offset += seconds

    # lifecycle ---------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Listen on ``host:port`` (0: any free port); return and set ``self.url``."""
        if self._runner is not None:
            raise RuntimeError(f"{type(self).__name__} is already started at {self.url}")
        # handler_cancellation: a client that hangs up (a broker timing out on /_test/slow)
        # ends the handler at once, as a real server would stop working for it.
        runner = web.AppRunner(
            self._build_app(), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{host_for_url(host, ssl_context is not None)}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _build_app(self) -> web.Application:
        app = web.Application()
        router = app.router
        router.add_post("/_sandbox/queue", self._control_queue)
        router.add_post("/_sandbox/expire", self._control_expire)
        router.add_post("/_sandbox/revoke-refresh", self._control_revoke_refresh)
        router.add_post("/_sandbox/credentials", self._control_credentials)
        router.add_post("/_sandbox/switches", self._control_credentials)
        router.add_post("/_sandbox/clock", self._control_clock)
        router.add_get("/_sandbox/state", self._control_state)
        # Test routes first: a subclass may end with a catch-all under the same prefix.
        for prefix in self.test_prefixes():
            base = f"{prefix}/_test"
            router.add_route("*", base + "/echo{tail:.*}", self.api_route(self._echo))
            router.add_route("GET", base + "/gzip", self.api_route(self._gzip))
            router.add_route("GET", base + "/bytes/{n}", self.api_route(self._bytes))
            router.add_route("GET", base + "/chunked/{n}", self.api_route(self._bytes))
            router.add_route("GET", base + "/broken/{n}", self.api_route(self._bytes))
            for method in ("POST", "PUT"):
                router.add_route(method, base + "/upload", self.api_route(self._upload))
            router.add_route("GET", base + "/cookies", self.api_route(self._cookies))
            router.add_route("GET", base + "/redirect", self.api_route(self._redirect))
            router.add_route("GET", base + "/slow/{seconds}", self.api_route(self._slow))
        self.add_routes(router)
        return app

    # what a subclass provides --------------------------------------------------------------

    @abc.abstractmethod
    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the ERP's own routes, wrapped with token_route / api_route."""

    @abc.abstractmethod
    def unauthorized(self, request: web.Request, credential: str | None) -> web.Response:
        """The ERP's answer to an API call without a live credential."""

    def test_prefixes(self) -> tuple[str, ...]:
        return ("",)

    def credential_of(self, request: web.Request) -> str | None:
        """The credential an API call carries (Bearer unless the ERP says otherwise)."""
        return bearer_token(request)

    async def pace(self, request: web.Request) -> None:
        """Hold an authenticated call before the gate (Infor's rate smoothing)."""
        return None

    def gate(self, request: web.Request, call: ApiCall) -> web.Response | None:
        """A check after authentication (quota, scopes); None lets the call through."""
        return None

    # records and synchronisation -----------------------------------------------------------

    def count_token_requests(self, grant: str | None = None) -> int:
        return sum(1 for r in self.token_requests if grant is None or r.grant == grant)

    async def wait_for_token_requests(
        self,
        n: int,
        timeout: float = 5.0,
        *,
        grant: str | None = None,
    ) -> None:
        """Return once at least ``n`` token requests (of ``grant``, if given) were answered."""
        what = "token requests" + (f" (grant {grant})" if grant else "")
        await self._wait_for(what, lambda: self.count_token_requests(grant), n, timeout)

    async def wait_for_api_requests(self, n: int, timeout: float = 5.0) -> None:
        """Return once at least ``n`` API requests were answered."""
        await self._wait_for("API requests", lambda: len(self.api_requests), n, timeout)

    async def _wait_for(self, what: str, count: Callable[[], int], n: int, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: count() >= n)
        except TimeoutError:
            raise TimeoutError(
                f"{type(self).__name__}: waited {timeout} s for {n} {what}, saw {count()}"
            ) from None

    async def _record(self, record: TokenRecord | ApiRecord) -> None:
        if isinstance(record, TokenRecord):
            self.token_requests.append(record)
        else:
            self.api_requests.append(record)
        async with self._changed:
            self._changed.notify_all()

    # fault switches ------------------------------------------------------------------------

    def queue_api_response(
        self,
        status: int,
        *,
        headers: HeadersLike = None,
        body: BodyLike = b"",
        count: int = 1,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``count`` API calls with this, before any credential check."""
        canned = CannedResponse.build(status, headers, body, delay)
        self._api_queue.extend([canned] * count)

    def queue_token_response(
        self,
        status: int,
        *,
        headers: HeadersLike = None,
        body: BodyLike = b"",
        count: int = 1,
        delay: float = 0.0,
    ) -> None:
        """Answer the next ``count`` credential-endpoint calls with this (after ``delay`` s)."""
        canned = CannedResponse.build(status, headers, body, delay)
        self._token_queue.extend([canned] * count)

    def expire_all_tokens(self) -> None:
        """Every access token and session issued so far stops working."""
        self._kill_where(lambda t: t.kind in API_KINDS)

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far stops working."""
        self._kill_where(lambda t: t.kind == "refresh")

    # issued tokens -------------------------------------------------------------------------

    @staticmethod
    def new_grant_id() -> str:
        return secrets.token_hex(8)

    def issue(
        self,
        kind: Literal["access", "refresh", "session"],
        *,
        grant_id: str,
        subject: str,
        lifetime: float | None,
        claims: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> str:
        """Mint a JWT-shaped token and remember it; ``lifetime`` None: it never expires."""
        now = int(self.wall())
        payload: JSON = {"iat": now, "sub": subject}
        if lifetime is not None:
            payload["exp"] = now + int(lifetime)
        token = mint_jwt({**payload, **(claims or {})})
        expires_at = None if lifetime is None else self.clock() + lifetime
        self._issued[token] = IssuedToken(
            kind, grant_id, subject, expires_at, data=dict(data or {})
        )
        return token

    def live_token(self, token: str | None, kinds: frozenset[str]) -> IssuedToken | None:
        """The issued token if it is of one of ``kinds``, not killed and not expired."""
        issued = self._issued.get(token) if token else None
        if issued is None or not issued.alive or issued.kind not in kinds:
            return None
        if issued.expires_at is not None and self.clock() >= issued.expires_at:
            return None
        return issued

    def kill_token(self, token: str) -> None:
        if (issued := self._issued.get(token)) is not None:
            issued.alive = False

    def kill_grant(self, grant_id: str) -> None:
        self._kill_where(lambda t: t.grant_id == grant_id)

    def revoke(self, token: str) -> None:
        """Client gave ``token`` back: a refresh token ends its grant, anything else just dies."""
        self.revocations.append(token)
        issued = self._issued.get(token)
        if issued is not None and issued.kind == "refresh":
            self.kill_grant(issued.grant_id)
        else:
            self.kill_token(token)

    def _kill_where(self, predicate: Callable[[IssuedToken], bool]) -> None:
        for issued in self._issued.values():
            if predicate(issued):
                issued.alive = False

    @staticmethod
    def client_matches(call: TokenCall, client_id: str, client_secret: str) -> str | None:
        """Check the client (Basic auth wins over the form); return a problem or None.

        Problems: ``"unknown_client"``, ``"bad_secret"``. Basic values may be form-encoded
        (RFC 6749 §2.3.1), so the decoded form is accepted too.
        """
        if call.basic is not None:
            candidates = [call.basic, tuple(urllib.parse.unquote_plus(v) for v in call.basic)]
        else:
            candidates = [(call.form.get("client_id", ""), call.form.get("client_secret", ""))]
        if not any(cid == client_id for cid, _ in candidates):
            return "unknown_client"
        if not any(cid == client_id and sec == client_secret for cid, sec in candidates):
            return "bad_secret"
        return None

    # wrappers ------------------------------------------------------------------------------

    def token_route(
        self,
        handler: Callable[[web.Request, TokenCall], Awaitable[web.StreamResponse]],
        grant: str | None = None,
    ) -> Handler:
        """Wrap a credential endpoint: delay, token queue, recording under ``grant``.

        ``grant`` None records the form's ``grant_type``.
        """

        async def wrapped(request: web.Request) -> web.StreamResponse:
            arrived = self.clock()
            call = await self._read_token_call(request)

            async def answer() -> web.StreamResponse:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if self._token_queue:
                    return await self._canned(self._token_queue.popleft())
                return await handler(request, call)

            def record(status: int) -> TokenRecord:
                name = grant if grant is not None else call.form.get("grant_type", "")
                return TokenRecord(arrived, name, call.form, CIMultiDict(request.headers), status)

            return await self._answer_and_record(answer, record)

        return wrapped

    def api_route(
        self, handler: Callable[[web.Request, ApiCall], Awaitable[web.StreamResponse]]
    ) -> Handler:
        """Wrap an API route: drain the body, API queue, credential check, gate, recording."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            arrived = self.clock()
            call = await self._read_api_call(request)

            async def answer() -> web.StreamResponse:
                if self._api_queue:
                    return await self._canned(self._api_queue.popleft())
                if self.live_token(call.credential, API_KINDS) is None:
                    return self.unauthorized(request, call.credential)
                await self.pace(request)
                return self.gate(request, call) or await handler(request, call)

            def record(status: int) -> ApiRecord:
                return ApiRecord(
                    arrived,
                    request.method,
                    request.raw_path,
                    CIMultiDict(request.headers),
                    call.body,
                    call.credential,
                    status,
                    call.body_length,
                    call.body_sha256,
                )

            return await self._answer_and_record(answer, record)

        return wrapped

    async def _answer_and_record(
        self,
        answer: Callable[[], Awaitable[web.StreamResponse]],
        record: Callable[[int], TokenRecord | ApiRecord],
    ) -> web.StreamResponse:
        """Run ``answer`` and record the outcome, also when the client hung up (499)."""
        status = 500
        try:
            response = await answer()
            status = response.status
            return response
        except (ConnectionError, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        finally:
            await self._record(record(status))

    @staticmethod
    async def _canned(canned: CannedResponse) -> web.Response:
        if canned.delay:
            await asyncio.sleep(canned.delay)
        return canned.response()

    async def _read_api_call(self, request: web.Request) -> ApiCall:
        digest = hashlib.sha256()
        kept = bytearray()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            digest.update(chunk)
            length += len(chunk)
            if len(kept) < self.record_body_limit:
                kept += chunk[: self.record_body_limit - len(kept)]
        return ApiCall(self.credential_of(request), bytes(kept), length, digest.hexdigest())

    @staticmethod
    async def _read_token_call(request: web.Request) -> TokenCall:
        body = await request.read()
        is_form = request.content_type == "application/x-www-form-urlencoded"
        form: dict[str, str] = {}
        if is_form:
            text = body.decode("utf-8", "replace")
            form = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
        return TokenCall(form, is_form, basic_credentials(request.headers.get("Authorization")))

    # control endpoints ---------------------------------------------------------------------

    async def _control_queue(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json(loads=orjson.loads)
            target = spec.get("target")
            if target not in ("api", "token"):
                raise ValueError('target must be "api" or "token"')
            headers = spec.get("headers") or {}
            if not isinstance(headers, dict):
                headers = [(as_str(k), as_str(v)) for k, v in headers]
            body = spec.get("body", "")
            enqueue = self.queue_api_response if target == "api" else self.queue_token_response
            enqueue(
                as_int(spec["status"]),
                headers=headers,
                body=body if isinstance(body, str | dict) else orjson.dumps(body),
                count=as_int(spec.get("count", 1)),
                delay=as_float(spec.get("delay", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return json_response({"error": f"bad queue request: {exc!r}"}, 400)
        return json_response(
            {"queued": {"api": len(self._api_queue), "token": len(self._token_queue)}}
        )

    async def _control_expire(self, request: web.Request) -> web.Response:
        self.expire_all_tokens()
        return json_response({"expired": True})

    async def _control_revoke_refresh(self, request: web.Request) -> web.Response:
        self.revoke_refresh_tokens()
        return json_response({"revoked": True})

    async def _control_credentials(self, request: web.Request) -> web.Response:
        try:
            if request.can_read_body:
                changes = await request.json(loads=orjson.loads)
            else:  # curl -X POST '…/_sandbox/switches?brute_force=true'
                changes = {name: _loose(value) for name, value in request.query.items()}
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            converted: JSON = {}
            for name, value in changes.items():
                if name not in self.settable:
                    raise ValueError(f"{name!r} is not settable; settable: {sorted(self.settable)}")
                try:
                    converted[name] = self.settable[name](value)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400)
        for name, value in converted.items():
            setattr(self, name, value)
        return json_response({"changed": sorted(converted)})

    async def _control_clock(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json(loads=orjson.loads)
            seconds = as_float(spec["advance"])
            if seconds < 0:
                raise ValueError("advance must not be negative: the clock only moves ahead")
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": f"bad clock request: {exc}"}, 400)
        self.advance(seconds)
        return json_response({"clock_offset": self.clock_offset})

    async def _control_state(self, request: web.Request) -> web.Response:
        return json_response(self.state())

    def state(self) -> JSON:
        return {
            "simulator": type(self).__name__,
            "url": self.url,
            "token_requests": dict(Counter(r.grant for r in self.token_requests)),
            "token_requests_total": len(self.token_requests),
            "api_requests": len(self.api_requests),
            "api_statuses": {
                str(k): v for k, v in Counter(r.status for r in self.api_requests).items()
            },
            "revocations": len(self.revocations),
            "queued": {"api": len(self._api_queue), "token": len(self._token_queue)},
            "clock_offset": self.clock_offset,
        }

    # test routes ---------------------------------------------------------------------------

    async def _echo(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
                "body_length": call.body_length,
                "body_sha256": call.body_sha256,
                "credential": call.credential,
            }
        )

    async def _gzip(self, request: web.Request, call: ApiCall) -> web.Response:
        # Compressed by hand and sent as bytes: aiohttp only compresses when asked to.
        return web.Response(
            body=_GZIP_BODY,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "X-Uncompressed-SHA256": hashlib.sha256(_GZIP_PLAIN).hexdigest(),
                "X-Compressed-SHA256": hashlib.sha256(_GZIP_BODY).hexdigest(),
            },
        )

    async def _bytes(self, request: web.Request, call: ApiCall) -> web.StreamResponse:
        try:
            n = int(request.match_info["n"])
            if n < 0:
                raise ValueError
        except ValueError:
            return json_response({"error": "n must be a non-negative integer"}, 400)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "/chunked/" in request.path:
            response.enable_chunked_encoding()
        else:
            response.content_length = n
        await response.prepare(request)
        if "/broken/" in request.path:
            # An ERP that dies mid-answer: half the announced body, then the connection goes.
            await response.write(b"".join(pattern_chunks(n))[: n // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        for chunk in pattern_chunks(n):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response({"length": call.body_length, "sha256": call.body_sha256})

    async def _cookies(self, request: web.Request, call: ApiCall) -> web.Response:
        response = json_response({"cookies": 2})
        response.headers.add("Set-Cookie", "session=sandbox-1; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark; Path=/; Max-Age=3600")
        return response

    async def _redirect(self, request: web.Request, call: ApiCall) -> web.Response:
        return web.Response(status=302, headers={"Location": "/elsewhere"}, text="Found")

    async def _slow(self, request: web.Request, call: ApiCall) -> web.Response:
        try:
            seconds = float(request.match_info["seconds"])
            if math.isnan(seconds):
                raise ValueError
        except ValueError:
            return json_response({"error": "seconds must be a number"}, 400)
        seconds = min(max(seconds, 0.0), MAX_SLOW_SECONDS)
        await asyncio.sleep(seconds)
        return json_response({"slept": seconds})
