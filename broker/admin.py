"""The admin listener: health, readiness, metrics, connector status and actions.

Read-only endpoints may be scraped from anywhere the listener is reachable. Endpoints that
change something (refresh, test, quit) answer only to loopback clients, unless an
``admin_token`` is configured and sent as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .answers import admin_answer, admin_error
from .errors import NoRoute, ProxyError
from .page import StatusPage

if TYPE_CHECKING:
    from .runtime import Served
    from .upstream import Connector

SERVER: web.AppKey[Served] = web.AppKey("server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_INDENT_2),
        status=status,
        content_type="application/json",
    )


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as exc:
        return admin_error(exc)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return _http_error(request, exc)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own 404/405 in the broker's JSON error shape."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        code, message = "method_not_allowed", f"{request.method} is not allowed here: {allowed}"
        headers = {"Allow": allowed}
    else:
        code, message, headers = "not_found", f"no admin endpoint at {request.path[:200]}", {}
    return admin_answer(exc.status, code, message, headers=headers)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """`Server: erp-broker`, not the framework's name and version."""
    response.headers["Server"] = "erp-broker"


def _require_operator(request: web.Request, bearer: str | None = None) -> None:
    token = request.app[SERVER].broker.config.admin_token
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


def _connector(request: web.Request) -> Connector:
    name = request.match_info["name"]
    connector = request.app[SERVER].broker.connectors.get(name)
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


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    broker = request.app[SERVER].broker
    ready, detail = broker.readiness()
    body = {
        "ready": ready,
        "draining": broker.draining,
        "connectors": detail,
        "store": broker.store_status(),
    }
    return _json(body, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    broker = request.app[SERVER].broker
    for connector in broker.connectors.values():
        connector.tokens.refresh_gauges()  # an expired token turns connector_up to 0 now
    registry = broker.metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def connectors(request: web.Request) -> web.Response:
    broker = request.app[SERVER].broker
    return _json({name: connector_info(c) for name, c in broker.connectors.items()})


async def connector(request: web.Request) -> web.Response:
    return _json(connector_info(_connector(request)))


async def refresh(request: web.Request) -> web.Response:
    _require_operator(request)
    target = _connector(request)
    await target.tokens.refresh_now()
    return _json({"refreshed": True, **connector_info(target)})


async def test(request: web.Request) -> web.Response:
    """A fresh login and the ERP's check endpoint, as ``erp-broker test-connection`` does."""
    from .probe import probe

    _require_operator(request)
    target = _connector(request)
    result = await probe(target.name, target.config)
    return _json(result.to_json(), 200 if result.ok else 502)


async def openapi(request: web.Request) -> web.Response:
    """IFS Apps 10 discovery with the connector's own session and credential."""
    from .config import IfsApps10Config
    from .direct import discovery_session
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
    async with discovery_session(config) as session:
        discovery = Discovery(
            target.name,
            config,
            target.route,
            session,
            target.tokens,
            target.authenticator.apply,
            request.app[SERVER].broker.store,
            auth_statuses=target.auth_statuses,
            before_send=target.wait_turn,
            broker_url=request.app[SERVER].proxy_url,
        )
        result = await discovery.run(projection, refresh=refresh)
    failed = projection is not None and bool(result.failed)
    return _json(result.to_json(), 502 if failed else 200)


async def quit_(request: web.Request) -> web.Response:
    _require_operator(request)
    request.app[SERVER].broker.shutdown_requested.set()
    return _json({"stopping": True})


def admin_app(server: Served) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app.on_response_prepare.append(_server_header)
    app[SERVER] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/connectors", connectors)
    app.router.add_get("/connectors/{name}", connector)
    app.router.add_post("/connectors/{name}/refresh", refresh)
    app.router.add_post("/connectors/{name}/test", test)
    app.router.add_get("/connectors/{name}/openapi", openapi)
    app.router.add_post("/quitquitquit", quit_)
    StatusPage(server, connector_info, _require_operator).add_routes(app)
    return app
