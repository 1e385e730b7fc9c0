"""One-shot commands that talk to a running broker or straight to the ERPs."""

from __future__ import annotations

import asyncio
import datetime
import sys
import time
from typing import Any

import orjson

from .config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _admin_base(config: Config) -> str:
    host, port = config.admin_address
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    delta = timestamp - now
    sign = "in " if delta >= 0 else ""
    suffix = "" if delta >= 0 else " ago"
    seconds = abs(delta)
    if seconds < 120:
        text = f"{seconds:.0f}s"
    elif seconds < 7200:
        text = f"{seconds / 60:.0f}m"
    else:
        text = f"{seconds / 3600:.1f}h"
    return f"{sign}{text}{suffix}"


def _error_text(error: Any) -> str:
    """``last_error`` as one cell: ``[cause] message``."""
    if not error:
        return "-"
    if isinstance(error, dict):
        return f"[{error.get('cause')}] {error.get('message', '')}"
    return str(error)


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def status(config: Config, fmt: str) -> int:
    """``erp-broker status``: the running broker's connectors, from its admin listener."""
    url = f"{_admin_base(config)}/connectors"
    from .client import Client, TransportError

    client = Client(ssl_context=None, limit=1, connect_timeout=5, read_timeout=5)
    try:
        async with asyncio.timeout(5):
            answer = await client.fetch("GET", url, limit=64 * 1024 * 1024)
        data: dict[str, Any] = orjson.loads(answer.body)
    except (TransportError, TimeoutError, orjson.JSONDecodeError) as exc:
        why = exc.failure.what if isinstance(exc, TransportError) else type(exc).__name__
        print(
            f"error: no broker answers at {url} ({why}): is it running with "
            f"admin_listen {config.admin_listen}?",
            file=sys.stderr,
        )
        return EXIT_FAILED
    finally:
        client.close()
    # Scripts and `kubectl exec` checks rely on the exit code: 0 only when every connector is up.
    down = {name: info for name, info in data.items() if info.get("token_state") != "valid"}
    code = EXIT_FAILED if down else EXIT_OK
    if fmt == "json":
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return code
    now = time.time()
    rows = [["CONNECTOR", "TYPE", "ROUTE", "UPSTREAM", "TOKEN", "EXPIRES", "LAST REFRESH", "UP"]]
    rows[0].insert(-1, "CREDENTIALS EXPIRE")
    for name, info in data.items():
        rows.append(
            [
                name,
                info.get("type", "-"),
                info.get("route", "-"),
                info.get("upstream_host", "-"),
                info.get("token_state", "-"),
                _age(info.get("expires_at"), now),
                _age(info.get("last_refresh"), now),
                _credentials_expire(info.get("credentials_expire"), now),
                "no" if name in down else "yes",
            ]
        )
    print(render_table(rows))
    # The whole cause, hint included: never cut to fit a column.
    for name, info in data.items():
        if info.get("last_error"):
            print(f"{name}: last error: {_error_text(info['last_error'])}")
    if down:
        print(f"not up: {', '.join(sorted(down))}", file=sys.stderr)
    return code


def _credentials_expire(day: str | None, now: float) -> str:
    """``2027-01-31 (in 58d)``: when the configured credentials expire, and how soon."""
    if not day:
        return "-"
    try:
        at = datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return day
    days = (at - now) / 86400
    return f"{day} ({'in ' if days >= 0 else ''}{abs(days):.0f}d{'' if days >= 0 else ' ago'})"


def _unknown(config: Config, name: str, command: str) -> int:
    print(
        f"{command}: no connector named {name!r} in {config.source}; configured: "
        f"{', '.join(sorted(config.connectors))}",
        file=sys.stderr,
    )
    return EXIT_USAGE


async def test_connection(config: Config, name: str | None, fmt: str, verbose: bool = False) -> int:
    """``erp-broker test-connection NAME|--all``: a fresh login and the ERP's check endpoint."""
    from .probe import probe

    if name is not None and name not in config.connectors:
        return _unknown(config, name, "test-connection")
    names = list(config.connectors) if name is None else [name]
    results = await asyncio.gather(*(probe(n, config.connectors[n]) for n in names))
    ok = all(result.ok for result in results)
    if fmt == "json":
        body = {"ok": ok, "connectors": [result.to_json() for result in results]}
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    else:
        width = max(len(n) for n in names)
        for result in results:
            for warning in result.warnings:
                print(f"warning: {result.connector}: {warning}", file=sys.stderr)
            mark = "ok  " if result.ok else "FAIL"
            cause = f"[{result.cause}] " if result.cause else ""
            print(f"{mark}  {result.connector.ljust(width)}  {cause}{result.message}")
            if verbose:
                for step in result.steps:
                    print(f"      {' ' * width}  {step}")
    return EXIT_OK if ok else EXIT_FAILED


async def discover(
    config: Config, name: str, projection: str | None, fmt: str, refresh: bool
) -> int:
    """``erp-broker discover NAME``: an IFS Apps 10 instance's projections and operations.

    Runs from the config alone: a fresh login, and the documents cached in the config's store.
    """
    from .app import listen_url
    from .config import IfsApps10Config
    from .coordinator import LocalCoordinator
    from .direct import FreshCredentials
    from .discovery import Discovery, render_table
    from .errors import BrokerError, ProxyError, StoreError, TokenError
    from .metrics import Metrics
    from .stores import open_store
    from .stores.memory import MemoryStore
    from .types import TokenStore
    from .upstream import Connector

    if name not in config.connectors:
        return _unknown(config, name, "discover")
    connector = config.connectors[name]
    if not isinstance(connector, IfsApps10Config):
        print(
            f"discover: connector {name!r} is {connector.type}: API discovery is for ifs_apps10",
            file=sys.stderr,
        )
        return EXIT_USAGE
    store: TokenStore | None
    try:
        store = await open_store(config.store)
    except StoreError as exc:
        print(f"warning: the store cannot be used, nothing is cached: {exc}", file=sys.stderr)
        store = None
    # The connector as a broker runs it, but on its own: a fresh login, nothing shared.
    upstream = Connector(
        name, connector, config.route_of(name), MemoryStore(), LocalCoordinator(), Metrics()
    )
    try:
        credentials = FreshCredentials(upstream.authenticator, timeout=connector.token_timeout)
        discovery = Discovery(
            upstream,
            store,
            credentials=credentials,
            broker_url=listen_url(*config.listen_address),
        )
        try:
            result = await discovery.run(projection, refresh=refresh)
        finally:
            await credentials.close()
            await upstream.close(revoke=False)
    except (TokenError, ProxyError) as exc:
        message = exc.message if isinstance(exc, ProxyError) else f"login failed: {exc}"
        print(f"discover: {name}: {message}", file=sys.stderr)
        return EXIT_FAILED
    except BrokerError as exc:
        print(f"discover: {name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if store is not None:
            await store.close()
    if fmt == "json":
        print(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_table(result))
    if projection is not None and result.failed:
        return EXIT_FAILED
    return EXIT_OK
