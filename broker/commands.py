"""One-shot commands that talk to a running broker or straight to the ERPs."""

from __future__ import annotations

import sys
import time
from typing import Any

import aiohttp
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


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def status(config: Config, fmt: str) -> int:
    """``erp-broker status``: the running broker's connectors, from its admin listener."""
    url = f"{_admin_base(config)}/connectors"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(url) as response:
                data: dict[str, Any] = orjson.loads(await response.read())
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(
            f"error: no broker answers at {url} ({type(exc).__name__}): is it running with "
            f"admin_listen {config.admin_listen}?",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if fmt == "json":
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    now = time.time()
    rows = [
        ["CONNECTOR", "TYPE", "ROUTE", "UPSTREAM", "TOKEN", "EXPIRES", "LAST REFRESH", "LAST ERROR"]
    ]
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
                (info.get("last_error") or "-")[:60],
            ]
        )
    print(render_table(rows))
    return EXIT_OK
