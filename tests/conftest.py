"""Shared fixtures: real ERP simulators on loopback (HTTPS with a test CA), real brokers."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import trustme

from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim, Simulator
from broker.types import TokenStore

BrokerFactory = Callable[..., Awaitable[BrokerServer]]


def metric(server: BrokerServer, name: str, **labels: str) -> float:
    """The value of one sample on a broker's registry (0 when the series has none yet)."""
    value = server.broker.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl(tls_ca: trustme.CA) -> ssl.SSLContext:
    """The simulators serve HTTPS: the default path under test is the real one."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


SimT = TypeVar("SimT", bound=Simulator)
SimStarter = Callable[[SimT], Awaitable[SimT]]


@pytest.fixture
async def start_sim(server_ssl: ssl.SSLContext) -> AsyncIterator[Callable[[Any], Awaitable[Any]]]:
    """Start simulators on loopback HTTPS (the test CA); all are stopped after the test."""
    started: list[Simulator] = []

    async def start(sim: SimT) -> SimT:
        await sim.start(ssl_context=server_ssl)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


@pytest.fixture
async def ifs_sim(start_sim: SimStarter[IfsApps10Sim]) -> IfsApps10Sim:
    return await start_sim(IfsApps10Sim())


def ifs_connector(sim: IfsApps10Sim, ca_file: str, **overrides: Any) -> dict[str, Any]:
    """Connector config for an IfsApps10Sim, as a user would write it."""
    return {
        "type": "ifs_apps10",
        "base_url": sim.url,
        "realm": sim.realm,
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "username": sim.username,
        "password": sim.password,
        "ca_file": ca_file,
        **overrides,
    }


@pytest.fixture
async def pso_sim(start_sim: SimStarter[PsoSim]) -> PsoSim:
    return await start_sim(PsoSim())


def pso_connector(sim: PsoSim, ca_file: str, **overrides: Any) -> dict[str, Any]:
    """Connector config for a PsoSim, as a user would write it."""
    return {
        "type": "ifs_pso",
        "base_url": sim.url,
        "account_id": sim.account_id,
        "username": sim.username,
        "password": sim.password,
        "ca_file": ca_file,
        **overrides,
    }


def offline_pso_connector(**overrides: Any) -> dict[str, Any]:
    """A valid connector config that needs no simulator (config parsing, CLI checks)."""
    return {
        "type": "ifs_pso",
        "base_url": "https://pso.example",
        "account_id": "a",
        "username": "u",
        "password": "p",
        **overrides,
    }


@pytest.fixture
async def infor_sim(start_sim: SimStarter[InforIonSim]) -> InforIonSim:
    return await start_sim(InforIonSim())


def infor_connector(sim: InforIonSim, ca_file: str, **overrides: Any) -> dict[str, Any]:
    """Connector config for an InforIonSim: the .ionapi content inline (``ionapi:``)."""
    return {"type": "infor_ion", "ionapi": sim.ionapi(), "ca_file": ca_file, **overrides}


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "tokens.db")


@pytest.fixture
async def make_broker(store_path: str) -> AsyncIterator[BrokerFactory]:
    """Start brokers on free loopback ports; all are stopped at the end of the test."""
    servers: list[BrokerServer] = []

    async def make(
        connectors: dict[str, Any], *, store: TokenStore | None = None, **top: Any
    ) -> BrokerServer:
        config = parse_config(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "store": {"sqlite": store_path},
                "grace_period": 2,
                "connectors": connectors,
                **top,
            }
        )
        server = BrokerServer(Broker(config, store=store))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The app's HTTP client: nothing decompressed, nothing followed."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
