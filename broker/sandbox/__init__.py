"""Simulators of the three ERPs, for the tests and for ``erp-broker demo``.

Each is a real aiohttp server (``await sim.start()`` → ``sim.url``), faithful to
``docs/protocols.md`` and with switches for the faults a broker must survive; the shared
machinery and routes are described in :mod:`broker.sandbox.base`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from .base import ApiRecord, Simulator, TokenRecord, jwt_claims, pattern_chunks, pattern_sha256
from .ifs_apps10 import IfsApps10Sim
from .ifs_pso import PsoSim
from .infor_ion import InforIonSim

__all__ = [
    "ApiRecord",
    "IfsApps10Sim",
    "InforIonSim",
    "PsoSim",
    "Sandboxes",
    "Simulator",
    "TokenRecord",
    "jwt_claims",
    "pattern_chunks",
    "pattern_sha256",
    "start_all",
]


@dataclass(frozen=True, slots=True)
class Sandboxes:
    """The three simulators, started."""

    ifs: IfsApps10Sim
    pso: PsoSim
    infor: InforIonSim

    @property
    def all(self) -> tuple[Simulator, ...]:
        return (self.ifs, self.pso, self.infor)

    async def stop(self) -> None:
        for sim in self.all:
            await sim.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_all(
    host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None
) -> Sandboxes:
    """Start one simulator of each ERP on free ports of ``host``, with default credentials."""
    sandboxes = Sandboxes(IfsApps10Sim(), PsoSim(), InforIonSim())
    try:
        for sim in sandboxes.all:
            await sim.start(host, ssl_context=ssl_context)
    except BaseException:
        await sandboxes.stop()
        raise
    return sandboxes
