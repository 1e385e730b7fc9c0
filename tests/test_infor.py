"""Infor ION through a real broker and the ION API simulator (HTTPS on loopback)."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.credential import Token
from broker.errors import ConfigError
from broker.sandbox import InforIonSim
from broker.stores import MemoryStore

from .conftest import BrokerFactory, infor_connector
from .procs import BrokerProcess

ME = "/infor/ifsservice/usermgt/v2/users/me"


class RecordingStore(MemoryStore):
    """A memory store that remembers every save and when it happened (monotonic)."""

    def __init__(self, *, shared: bool = False) -> None:
        super().__init__(shared=shared)
        self.saved: list[tuple[float, str, Token]] = []

    async def save(self, key: str, token: Token) -> None:
        await super().save(key, token)
        self.saved.append((time.monotonic(), key, token))


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


def broker_config(connectors: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "grace_period": 2,
        "connectors": connectors,
    }


class TestPasswordGrant:
    async def test_service_account_grant_basic_client_and_tenant_path(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """username=saak, password=sask, the client as HTTP Basic; Bearer to iu/ti/..."""
        server = await make_broker({"infor": infor_connector(infor_sim, ca_file)})
        status, body = await get(http, f"{server.proxy_url}{ME}")
        assert status == 200 and body["response"]["userlist"][0]["tenant"] == infor_sim.tenant
        [login] = infor_sim.token_requests
        assert login.form == {
            "grant_type": "password",
            "username": infor_sim.saak,
            "password": infor_sim.sask,
        }
        assert login.headers["Authorization"] == basic(infor_sim.client_id, infor_sim.client_secret)
        call = infor_sim.api_requests[-1]
        assert call.raw_path == f"/{infor_sim.tenant}/ifsservice/usermgt/v2/users/me"
        assert call.headers["Authorization"] == f"Bearer {call.credential}"

    async def test_403_passes_through_without_a_token_request(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """403 (scope or role missing) is not an expired token: no refresh, no replay, the ERP's body."""
        infor_sim.forbidden_paths = {f"/{infor_sim.tenant}/M3"}
        server = await make_broker({"infor": infor_connector(infor_sim, ca_file)})
        await server.broker.wait_ready(5)
        async with http.get(
            f"{server.proxy_url}/infor/M3/m3api-rest/v2/execute/CRS610MI/LstByNumber"
        ) as resp:
            assert resp.status == 403
            assert "X-Broker-Error" not in resp.headers
            assert (await resp.json())["error"] == "insufficient_scope"
        assert infor_sim.count_token_requests() == 1
        assert len(infor_sim.api_requests) == 1

    async def test_dead_refresh_token_falls_back_to_password(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A refresh token rejected with invalid_grant leads to a new password grant, not a failure."""
        server = await make_broker({"infor": infor_connector(infor_sim, ca_file)})
        assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        infor_sim.revoke_refresh_tokens()
        infor_sim.expire_all_tokens()
        assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        assert [(r.grant, r.status) for r in infor_sim.token_requests] == [
            ("password", 200),
            ("refresh_token", 400),
            ("password", 200),
        ]

    @pytest.mark.parametrize(
        ("change", "hint"),
        [({"sask": "wrong-sask"}, "saak/sask"), ({"cs": "wrong-client-secret"}, "ci/cs")],
        ids=["service-account-keys", "client"],
    )
    async def test_rejected_keys_name_the_ionapi_field(
        self,
        change: dict[str, str],
        hint: str,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Wrong saak/sask or ci/cs: auth_failed/connector_unavailable naming the .ionapi keys; one attempt."""
        conn = infor_connector(infor_sim, ca_file)
        conn["ionapi"] = {**conn["ionapi"], **change}
        server = await make_broker({"infor": conn})
        for _ in range(3):
            async with http.get(f"{server.proxy_url}{ME}") as resp:
                assert resp.headers["X-Broker-Error"] in ("auth_failed", "connector_unavailable")
                message = (await resp.json())["error"]["message"]
                assert hint in message and next(iter(change.values())) not in message
        assert infor_sim.count_token_requests() == 1


class TestIonapiFile:
    @pytest.mark.parametrize(
        "variant",
        ["capital-keys", "pu-without-slash", "file-path", "file-reference", "env-reference"],
    )
    async def test_variants(
        self,
        variant: str,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every way of writing the .ionapi gets a token from pu+ot and calls iu/ti (revoke at pu+or)."""
        ionapi = infor_sim.ionapi(
            upper_keys=variant == "capital-keys", pu_trailing_slash=variant != "pu-without-slash"
        )
        path = tmp_path / "prod.ionapi"
        path.write_bytes(orjson.dumps(ionapi, option=orjson.OPT_INDENT_2) + b"\n")
        conn: dict[str, Any] = {"type": "infor_ion", "ca_file": ca_file}
        if variant == "file-path":
            conn["ionapi_file"] = str(path)
        elif variant == "file-reference":
            conn["ionapi"] = f"${{file:{path}}}"
        elif variant == "env-reference":
            monkeypatch.setenv("INFOR_IONAPI", path.read_text())
            conn["ionapi"] = "${INFOR_IONAPI}"
        else:
            conn["ionapi"] = ionapi
        server = await make_broker({"infor": conn})
        assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        assert infor_sim.token_requests[0].status == 200
        connector = server.broker.connectors["infor"]
        assert (
            connector.authenticator.token_url
            == f"{infor_sim.url}/{infor_sim.tenant}/as/token.oauth2"
        )  # type: ignore[attr-defined]
        assert (
            connector.authenticator.revoke_url
            == f"{infor_sim.url}/{infor_sim.tenant}/as/revoke_token.oauth2"
        )  # type: ignore[attr-defined]

    @pytest.mark.parametrize("missing", ["sask", "ot", "ci"])
    def test_missing_key_is_a_config_error_naming_it(self, missing: str, tmp_path: Path) -> None:
        """A .ionapi without a required key fails at startup with the key's path."""
        sim = InforIonSim()
        sim.url = "https://ion.example.com"
        ionapi = {k: v for k, v in sim.ionapi().items() if k != missing}
        path = tmp_path / "prod.ionapi"
        path.write_bytes(orjson.dumps(ionapi))
        with pytest.raises(ConfigError) as caught:
            parse_config(
                {"connectors": {"infor": {"type": "infor_ion", "ionapi_file": str(path)}}}, "b.yaml"
            )
        assert caught.value.problems == [
            f"b.yaml: connectors.infor.ionapi_file.{missing}: required key is missing"
        ]

    def test_secrets_in_the_file_are_masked(self) -> None:
        """cs, saak and sask are secrets: the effective config never shows them."""
        sim = InforIonSim()
        sim.url = "https://ion.example.com"
        config = parse_config(
            {"connectors": {"infor": {"type": "infor_ion", "ionapi": sim.ionapi()}}}
        )
        text = orjson.dumps(config.redacted()).decode()
        for secret in (sim.client_secret, sim.saak, sim.sask):
            assert secret not in text


class TestRefreshRotation:
    async def test_three_rotations_in_a_row(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Each refresh returns a new refresh token and kills the old: each is persisted before use,
        none is ever sent twice, and the store always holds the newest."""
        infor_sim.token_lifetime = 1
        store = RecordingStore()
        server = await make_broker({"infor": infor_connector(infor_sim, ca_file)}, store=store)
        for rotation in range(1, 4):
            await infor_sim.wait_for_token_requests(rotation, grant="refresh_token")
            assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        refreshes = [r for r in infor_sim.token_requests if r.grant == "refresh_token"][:3]
        assert [r.status for r in refreshes] == [200, 200, 200]
        sent = [r.form["refresh_token"] for r in refreshes]
        assert len(set(sent)) == 3
        for record in refreshes:
            assert record.headers["Authorization"] == basic(
                infor_sim.client_id, infor_sim.client_secret
            )
        # Refresh n sent the refresh token of the n-th persisted token, and nothing older.
        saved = [token for _, _, token in store.saved]
        assert sent == [token.refresh for token in saved[:3]]
        assert len({token.refresh for token in saved}) == len(saved)
        key = store.saved[-1][1]
        stored = await store.load(key)
        assert (
            stored is not None
            and stored.refresh == server.broker.connectors["infor"].tokens.current.refresh
        )  # type: ignore[union-attr]
        # Every access token reached the ERP only after it was persisted.
        saved_at = {token.access: at for at, _, token in store.saved}
        for call in infor_sim.api_requests:
            assert call.credential in saved_at and saved_at[call.credential] <= call.time
        assert all(call.status == 200 for call in infor_sim.api_requests)

    async def test_idle_grant_is_kept_alive(
        self, infor_sim: InforIonSim, ca_file: str, make_broker: BrokerFactory
    ) -> None:
        """A grant left idle is refreshed before grant_keepalive_days, even with a long-lived token."""
        await make_broker(
            {"infor": infor_connector(infor_sim, ca_file, grant_keepalive_days=1 / 86400)}
        )
        await infor_sim.wait_for_token_requests(1, grant="refresh_token")
        assert infor_sim.token_requests[0].grant == "password"
        assert infor_sim.token_requests[1].status == 200
        assert not infor_sim.api_requests


async def start_broker(
    connectors: dict[str, Any], tmp_path: Path, store: MemoryStore | None = None
) -> BrokerServer:
    server = BrokerServer(Broker(parse_config(broker_config(connectors, tmp_path)), store=store))
    await server.start()
    return server


class TestRevocation:
    async def test_grant_revoked_at_shutdown(
        self, infor_sim: InforIonSim, ca_file: str, tmp_path: Path, http: aiohttp.ClientSession
    ) -> None:
        """Stopping the broker revokes the refresh grant at pu+or with client Basic auth; the store forgets it."""
        store = RecordingStore()
        server = await start_broker({"infor": infor_connector(infor_sim, ca_file)}, tmp_path, store)
        assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        refresh = server.broker.connectors["infor"].tokens.current.refresh  # type: ignore[union-attr]
        await server.stop()
        [revoke] = [r for r in infor_sim.token_requests if r.grant == "revoke"]
        assert revoke.status == 200
        assert revoke.form == {"token": refresh, "token_type_hint": "refresh_token"}
        assert revoke.headers["Authorization"] == basic(
            infor_sim.client_id, infor_sim.client_secret
        )
        assert infor_sim.revocations == [refresh]
        assert await store.load(store.saved[-1][1]) is None

    @pytest.mark.parametrize("setting", ["revoke_on_shutdown-false", "shared-store"])
    async def test_not_revoked(
        self,
        setting: str,
        infor_sim: InforIonSim,
        ca_file: str,
        tmp_path: Path,
        http: aiohttp.ClientSession,
    ) -> None:
        """No revocation when configured off, or when the store is shared with other replicas."""
        overrides = {"revoke_on_shutdown": False} if setting == "revoke_on_shutdown-false" else {}
        store = RecordingStore(shared=setting == "shared-store")
        server = await start_broker(
            {"infor": infor_connector(infor_sim, ca_file, **overrides)}, tmp_path, store
        )
        assert (await get(http, f"{server.proxy_url}{ME}"))[0] == 200
        await server.stop()
        assert infor_sim.revocations == []
        assert infor_sim.count_token_requests("revoke") == 0

    async def test_sigterm_revokes(
        self, infor_sim: InforIonSim, ca_file: str, tmp_path: Path
    ) -> None:
        """`erp-broker run` with an .ionapi file: SIGTERM revokes the grant, then exits 0."""
        path = tmp_path / "prod.ionapi"
        path.write_bytes(orjson.dumps(infor_sim.ionapi()))
        config = broker_config(
            {"infor": {"type": "infor_ion", "ionapi_file": str(path), "ca_file": ca_file}}, tmp_path
        )
        proc = await BrokerProcess(config, tmp_path).start()
        try:
            async with aiohttp.ClientSession() as http:
                assert (await get(http, f"{proc.proxy_url}{ME}"))[0] == 200
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0, proc.output
        finally:
            await proc.kill()
        issued_refresh = [r for r in infor_sim.token_requests if r.grant == "password"]
        assert len(issued_refresh) == 1
        [revoke] = [r for r in infor_sim.token_requests if r.grant == "revoke"]
        assert revoke.status == 200 and revoke.form["token_type_hint"] == "refresh_token"
        assert infor_sim.revocations == [revoke.form["token"]]
        assert any(e.get("event") == "token_revoked" for e in proc.events)
