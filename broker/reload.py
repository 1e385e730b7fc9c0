"""Credential reload: a rotated secret file is picked up without a restart.

Kubernetes updates a mounted Secret in place (an atomic symlink swap). Every
``credentials_reload_interval`` seconds the broker re-reads its config file — and with it
every ``${file:…}`` reference and ``.ionapi`` file — and hands changed credentials to their
connectors. A connector paused after rejected credentials tries the new ones at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from .config import load_config
from .errors import ConfigError
from .upstream import Connector

log = structlog.get_logger("broker.reload")


async def reload_credentials(source: str, connectors: Mapping[str, Connector]) -> list[str]:
    """Re-read ``source``; return the names of connectors whose credentials changed."""
    config = await asyncio.to_thread(load_config, source)
    changed = []
    for name, connector in connectors.items():
        fresh = config.connectors.get(name)
        if fresh is not None and fresh.type == connector.config.type:
            if connector.update_credentials(fresh):
                changed.append(name)
    return changed


async def watch_credentials(
    source: str, connectors: Mapping[str, Connector], interval: float
) -> None:
    """Reload forever; a config that no longer loads is logged once and otherwise ignored."""
    last_problem: str | None = None
    while True:
        await asyncio.sleep(interval)
        try:
            await reload_credentials(source, connectors)
        except ConfigError as exc:
            problem = "; ".join(exc.problems)
            if problem != last_problem:
                log.error("config_reload_failed", problems=exc.problems)
            last_problem = problem
        else:
            last_problem = None
