"""Fixtures for the simulator tests: real simulators on loopback and a real client session."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim, Simulator
from broker.sandbox.ifs_pso import PSO_BASE

Login = Callable[[Simulator], Awaitable[dict[str, str]]]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ifs() -> AsyncIterator[IfsApps10Sim]:
    async with IfsApps10Sim() as sim:
        yield sim


@pytest.fixture
async def pso() -> AsyncIterator[PsoSim]:
    async with PsoSim() as sim:
        yield sim


@pytest.fixture
async def ion() -> AsyncIterator[InforIonSim]:
    async with InforIonSim() as sim:
        yield sim


@pytest.fixture(params=[IfsApps10Sim, PsoSim, InforIonSim], ids=["ifs", "pso", "ion"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[Simulator]:
    async with request.param() as started:
        yield started


def _ifs_password_form(sim: IfsApps10Sim) -> dict[str, str]:
    return {
        "grant_type": "password",
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "username": sim.username,
        "password": sim.password,
        "scope": "openid microprofile-jwt",
    }


def _ion_password_form(sim: InforIonSim) -> dict[str, str]:
    return {
        "grant_type": "password",
        "client_id": sim.client_id,
        "client_secret": sim.client_secret,
        "username": sim.saak,
        "password": sim.sask,
    }


@pytest.fixture
def ifs_form(ifs: IfsApps10Sim) -> dict[str, str]:
    """A correct password-grant form for the ``ifs`` simulator."""
    return _ifs_password_form(ifs)


@pytest.fixture
def ion_form(ion: InforIonSim) -> dict[str, str]:
    """A correct password-grant form (client in the body) for the ``ion`` simulator."""
    return _ion_password_form(ion)


@pytest.fixture
def login(http: aiohttp.ClientSession) -> Login:
    """Obtain a fresh credential from any simulator, as the headers that carry it."""

    async def obtain(sim: Simulator) -> dict[str, str]:
        if isinstance(sim, IfsApps10Sim):
            url = f"{sim.url}/auth/realms/{sim.realm}/protocol/openid-connect/token"
            async with http.post(url, data=_ifs_password_form(sim)) as response:
                assert response.status == 200
                return {"Authorization": f"Bearer {(await response.json())['access_token']}"}
        if isinstance(sim, PsoSim):
            form = {"accountId": sim.account_id, "userName": sim.username, "password": sim.password}
            async with http.post(f"{sim.url}{PSO_BASE}/session", data=form) as response:
                assert response.status == 200
                return {"apiKey": (await response.json())["SessionToken"]}
        assert isinstance(sim, InforIonSim)
        url = f"{sim.url}/{sim.tenant}/as/token.oauth2"
        async with http.post(url, data=_ion_password_form(sim)) as response:
            assert response.status == 200
            return {"Authorization": f"Bearer {(await response.json())['access_token']}"}

    return obtain


@pytest.fixture
def basic() -> Callable[[str, str], dict[str, str]]:
    """Headers with HTTP Basic credentials (aiohttp.BasicAuth is deprecated)."""

    def header(user: str, password: str) -> dict[str, str]:
        return {
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        }

    return header
