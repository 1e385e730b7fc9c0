"""The admin listener: health, readiness, metrics, connector status and actions.

Read-only endpoints may be scraped from anywhere the listener is reachable. Endpoints that
change something (refresh, test, quit) answer only to loopback clients, unless an
``admin_token`` is configured and sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .answers import admin_answer, admin_error, refusal_answer
from .errors import NoRoute, ProxyError
from .page import StatusPage
from .routes import AdminRequest, Router
from .server import Refusal, Request, Response

if TYPE_CHECKING:
    from .runtime import Served
    from .upstream import Connector


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        status,
        [("Content-Type", "application/json")],
        orjson.dumps(data, option=orjson.OPT_INDENT_2),
    )


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


def _not_found(request: AdminRequest) -> Response:
    return admin_answer(404, "not_found", f"no admin endpoint at {request.path[:200]}")


def _not_allowed(request: AdminRequest, allowed: str) -> Response:
    message = f"{request.method} is not allowed here: {allowed}"
    return admin_answer(405, "method_not_allowed", message, headers={"Allow": allowed})


def _stamped(response: Response, method: str = "GET") -> Response:
    """`Server: erp-broker`, not a framework's name; a HEAD answer's length is its GET's."""
    response.headers.append(("Server", "erp-broker"))
    if method == "HEAD" and not any(n.lower() == "content-length" for n, _ in response.headers):
        response.headers.append(("Content-Length", str(len(response.body))))
    return response


def refusal(refused: Refusal) -> Response:
    """A request the admin listener refused itself, as the proxy listener answers it."""
    return _stamped(refusal_answer(refused))


def _require_operator(request: AdminRequest, bearer: str | None = None) -> None:
    token = request.served.broker.config.admin_token
    if token is not None:
        # a browser's form sends the token as a field (``bearer``): it cannot set the header
        sent = request.headers.get("Authorization", "") if bearer is None else f"Bearer {bearer}"
        if hmac.compare_digest(sent.encode(), f"Bearer {token.get()}".encode()):
            return
        raise Forbidden("this admin action needs Authorization: Bearer <admin_token>")
    peer = request.remote or ""
    try:
        loopback = ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("admin actions answer only on loopback unless admin_token is configured")


def _connector(request: AdminRequest) -> Connector:
    name = request.match_info["name"]
    connector = request.served.broker.connectors.get(name)
    if connector is None:
        raise NoRoute(f"no connector named {name!r}")
    return connector


def connector_info(connector: Connector) -> dict[str, Any]:
    """What an operator may see of a connector: never a secret or a token."""
    return {
        "type": connector.config.type,
        "route": connector.route,
        "upstream_host": connector.host,
        "tls_verify": connector.config.tls_verify,
        **connector.tokens.status(),
        # When the configured password or client secret expires (config: credentials_expire).
        "credentials_expire": (
            expire.isoformat() if (expire := connector.credentials_expire) is not None else None
        ),
    }


async def healthz(request: AdminRequest) -> Response:
    return _json({"status": "ok"})


async def readyz(request: AdminRequest) -> Response:
    broker = request.served.broker
    ready, detail = broker.readiness()
    body = {
        "ready": ready,
        "draining": broker.draining,
        "connectors": detail,
        "store": broker.store_status(),
    }
    return _json(body, 200 if ready else 503)


async def metrics(request: AdminRequest) -> Response:
    broker = request.served.broker
    for connector in broker.connectors.values():
        connector.tokens.refresh_gauges()  # an expired token turns connector_up to 0 now
    registry = broker.metrics.registry
    return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], generate_latest(registry))


async def connectors(request: AdminRequest) -> Response:
    broker = request.served.broker
    return _json({name: connector_info(c) for name, c in broker.connectors.items()})


async def connector(request: AdminRequest) -> Response:
    return _json(connector_info(_connector(request)))


async def refresh(request: AdminRequest) -> Response:
    _require_operator(request)
    target = _connector(request)
    await target.tokens.refresh_now()
    return _json({"refreshed": True, **connector_info(target)})


async def test(request: AdminRequest) -> Response:
    """A fresh login and the ERP's check endpoint, as ``erp-broker test-connection`` does."""
    from .probe import probe

    _require_operator(request)
    target = _connector(request)
    result = await probe(target.name, target.config)
    return _json(result.to_json(), 200 if result.ok else 502)


async def openapi(request: AdminRequest) -> Response:
    """IFS Apps 10 discovery with the connector's own session and credential."""
    from .config import IfsApps10Config
    from .discovery import Discovery

    target = _connector(request)
    config = target.config
    if not isinstance(config, IfsApps10Config):
        raise NoRoute(
            f"connector {target.name!r} is {config.type}: API discovery is for ifs_apps10 "
            "connectors",
            connector=target.name,
        )
    refresh = request.query.get("refresh", "").lower() in ("1", "true", "yes")
    if refresh:
        _require_operator(request)  # it makes the ERP serve every document again
    projection = request.query.get("projection") or None
    discovery = Discovery(target, request.served.broker.store, broker_url=request.served.proxy_url)
    result = await discovery.run(projection, refresh=refresh)
    failed = projection is not None and bool(result.failed)
    return _json(result.to_json(), 502 if failed else 200)


async def quit_(request: AdminRequest) -> Response:
    _require_operator(request)
    request.served.broker.shutdown_requested.set()
    return _json({"stopping": True})


class Admin:
    """The admin listener's handler: finds the endpoint, answers errors as JSON. A
    :class:`~broker.server.Server` (the proxy listener's kind) serves it on ``admin_listen``;
    :meth:`start` and :meth:`close` run what the endpoints need beside them (the status
    page's activity sampling)."""

    def __init__(self, server: Served) -> None:
        self.served = server
        self._background = contextlib.AsyncExitStack()
        router = self.router = Router()
        router.add_get("/healthz", healthz)
        router.add_get("/readyz", readyz)
        router.add_get("/metrics", metrics)
        router.add_get("/connectors", connectors)
        router.add_get("/connectors/{name}", connector)
        router.add_post("/connectors/{name}/refresh", refresh)
        router.add_post("/connectors/{name}/test", test)
        router.add_get("/connectors/{name}/openapi", openapi)
        router.add_post("/quitquitquit", quit_)
        StatusPage(server, connector_info, _require_operator).add_routes(router)

    async def start(self) -> None:
        for background in self.router.background:
            await self._background.enter_async_context(background())

    async def close(self) -> None:
        await self._background.aclose()

    async def handle(self, wire: Request) -> Response:
        request = AdminRequest(
            self.served, wire.method, wire.raw_path, wire.headers, wire.remote, body=wire.content
        )
        return _stamped(await self._answer(request), request.method)

    async def _answer(self, request: AdminRequest) -> Response:
        found = self.router.resolve(request.target)
        if found is None:
            return _not_found(request)
        handlers, request.match_info = found
        handler = handlers.get(request.method)
        if handler is None:
            return _not_allowed(request, ", ".join(sorted(handlers)))
        try:
            return await handler(request)
        except ProxyError as exc:
            return admin_error(exc)
