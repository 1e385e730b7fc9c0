"""`erp-broker test-connection` and `POST /connectors/<name>/test` against the three simulators."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from broker import commands
from broker.config import parse_config
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim

from .conftest import BrokerFactory, ifs_connector, infor_connector, pso_connector


async def cli(*args: str) -> tuple[int, str, str]:
    """`python -m broker ...` as a subprocess, without blocking the simulators' event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, connectors: dict[str, Any]) -> str:
    path = tmp_path / "broker.yaml"
    path.write_text(
        yaml.safe_dump({"store": {"sqlite": str(tmp_path / "t.db")}, "connectors": connectors})
    )
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def all_three(
    ifs_sim: IfsApps10Sim, pso_sim: PsoSim, infor_sim: InforIonSim, ca_file: str
) -> dict[str, Any]:
    return {
        "ifs": ifs_connector(ifs_sim, ca_file),
        "pso": pso_connector(pso_sim, ca_file),
        "infor": infor_connector(infor_sim, ca_file),
    }


async def run(
    connectors: dict[str, Any],
    name: str | None,
    capsys: pytest.CaptureFixture[str],
    fmt: str = "json",
) -> tuple[int, Any]:
    code = await commands.test_connection(parse_config({"connectors": connectors}), name, fmt)
    out = capsys.readouterr().out
    return code, orjson.loads(out) if fmt == "json" else out


class TestCommandLine:
    async def test_exit_codes(
        self, ifs_sim: IfsApps10Sim, pso_sim: PsoSim, ca_file: str, tmp_path: Path
    ) -> None:
        """0 when the credential works, 1 when the ERP rejects it, 2 for a connector that is not configured."""
        good = write_config(
            tmp_path,
            {
                "ifs": ifs_connector(ifs_sim, ca_file),
                "pso": pso_connector(pso_sim, ca_file, account_id="WRONG"),
            },
        )
        (ok, out, _), (failed, bad_out, _), (usage, _, usage_err) = await asyncio.gather(
            cli("test-connection", "-c", good, "ifs"),
            cli("test-connection", "-c", good, "pso"),
            cli("test-connection", "-c", good, "nope"),
        )
        assert (ok, failed, usage) == (0, 1, 2)
        assert re.fullmatch(
            r"ok    ifs  token obtained in \d+ ms; GET \.\.\./Projections -> 200\n", out
        )
        assert (
            bad_out.startswith("FAIL  pso  [invalid_credentials] login rejected: ")
            and "check account_id" in bad_out
        )
        assert "no connector named 'nope'" in usage_err and "ifs, pso" in usage_err

    async def test_all_text(
        self, all_three: dict[str, Any], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--all prints one aligned success line per connector naming the check endpoint."""
        code, out = await run(all_three, None, capsys, fmt="text")
        assert code == 0
        lines = out.splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["ok", "ifs"],
            ["ok", "pso"],
            ["ok", "infor"],
        ]
        assert lines[1].endswith("GET .../session -> 200") and lines[2].endswith(
            "GET .../me -> 200"
        )


class TestProbe:
    async def test_all_json_fresh_logins_given_back(
        self,
        all_three: dict[str, Any],
        ifs_sim: IfsApps10Sim,
        pso_sim: PsoSim,
        infor_sim: InforIonSim,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Each connector: one fresh login, one check call with it; the Infor grant and IFS session are given back."""
        code, body = await run(all_three, None, capsys)
        assert code == 0 and body["ok"] is True
        results = {r["connector"]: r for r in body["connectors"]}
        assert results["infor"]["check"]["url"].endswith(
            f"/{infor_sim.tenant}/ifsservice/usermgt/v2/users/me"
        )
        assert results["pso"]["check"]["url"].endswith(
            "/IFSSchedulingRESTfulGateway/api/v1/scheduling/session"
        )
        assert all(
            r["check"]["status"] == 200 and r["token_ms"] is not None for r in results.values()
        )
        for sim in (ifs_sim, pso_sim, infor_sim):
            assert len(sim.api_requests) == 1 and sim.api_requests[0].status == 200
        assert pso_sim.api_requests[0].headers["apiKey"] == pso_sim.api_requests[0].credential
        assert (
            infor_sim.count_token_requests("revoke") == 1
            and ifs_sim.count_token_requests("logout") == 1
        )

    @pytest.mark.parametrize(
        ("name", "change", "expected"),
        [
            ("ifs", {"client_secret": "wrong-secret"}, "check client_id, client_secret"),
            ("ifs", {"password": "wrong-password"}, "check username and password"),
            ("pso", {"account_id": "WRONG"}, "check account_id, username and password"),
            ("infor", {"sask": "wrong-sask"}, "saak/sask"),
        ],
        ids=["ifs-secret", "ifs-password", "pso-account", "infor-sask"],
    )
    async def test_rejected_credentials_say_what_to_fix(
        self,
        name: str,
        change: dict[str, str],
        expected: str,
        all_three: dict[str, Any],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A rejected login fails at the login stage with a message naming the settings to check."""
        conn = dict(all_three[name])
        if name == "infor":
            conn["ionapi"] = {**conn["ionapi"], **change}
        else:
            conn.update(change)
        code, body = await run({name: conn}, name, capsys)
        [result] = body["connectors"]
        assert code == 1 and result["ok"] is False and result["stage"] == "login"
        assert result["message"].startswith("login rejected:") and expected in result["message"]
        assert next(iter(change.values())) not in orjson.dumps(body).decode()

    async def test_unreachable_host(
        self, ifs_sim: IfsApps10Sim, ca_file: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing listening: the message says the host cannot be reached."""
        conn = ifs_connector(ifs_sim, ca_file, base_url=f"https://localhost:{free_port()}")
        code, body = await run({"ifs": conn}, "ifs", capsys)
        message = body["connectors"][0]["message"]
        assert (
            code == 1
            and "cannot reach the token endpoint localhost" in message
            and "base_url" in message
        )

    async def test_tls_error(
        self, ifs_sim: IfsApps10Sim, ca_file: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A certificate the system CAs do not trust: a TLS error pointing at ca_file."""
        conn = ifs_connector(ifs_sim, ca_file)
        del conn["ca_file"]
        code, body = await run({"ifs": conn}, "ifs", capsys)
        message = body["connectors"][0]["message"]
        assert code == 1 and "TLS error" in message and "ca_file" in message

    async def test_tls_verify_off_warns(
        self, ifs_sim: IfsApps10Sim, ca_file: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """tls_verify: false works, with a warning in the result."""
        conn = ifs_connector(ifs_sim, ca_file, tls_verify=False)
        del conn["ca_file"]
        code, body = await run({"ifs": conn}, "ifs", capsys)
        assert code == 0 and "tls_verify is false" in body["connectors"][0]["warnings"][0]

    async def test_check_endpoint_status(
        self,
        infor_sim: InforIonSim,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A credential that works but a check endpoint that refuses: the status and what it means."""
        infor_sim.forbidden_paths = {f"/{infor_sim.tenant}/ifsservice"}
        connectors = {
            "infor": infor_connector(infor_sim, ca_file),
            "ifs": ifs_connector(
                ifs_sim, ca_file, test_path="main/ifsapplications/projection/v1/Nope.svc/"
            ),
        }
        code, body = await run(connectors, None, capsys)
        results = {r["connector"]: r for r in body["connectors"]}
        assert code == 1
        assert results["infor"]["stage"] == "check" and results["infor"]["check"]["status"] == 403
        assert "lacks a role or scope" in results["infor"]["message"]
        assert (
            results["ifs"]["check"]["status"] == 404
            and "check test_path" in results["ifs"]["message"]
        )


class TestAdminEndpoint:
    async def test_ok_failed_and_unknown(
        self,
        all_three: dict[str, Any],
        ifs_sim: IfsApps10Sim,
        pso_sim: PsoSim,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """200 with the result when the test passes, 502 when it fails, 404 for an unknown connector;
        the broker's own credential is neither used nor changed."""
        server = await make_broker(all_three)
        await server.broker.wait_ready(5)
        held = server.broker.connectors["ifs"].tokens.current
        async with http.post(f"{server.admin_url}/connectors/ifs/test") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["ok"] is True and body["check"]["status"] == 200
        assert (
            ifs_sim.count_token_requests("password") == 2
        )  # the broker's login, then the test's own
        assert ifs_sim.api_requests[-1].credential != held.access  # type: ignore[union-attr]
        assert server.broker.connectors["ifs"].tokens.current is held
        pso_sim.password = "rotated-elsewhere"
        async with http.post(f"{server.admin_url}/connectors/pso/test") as resp:
            assert resp.status == 502
            body = await resp.json()
        assert body["ok"] is False and "account_id" in body["message"]
        async with http.post(f"{server.admin_url}/connectors/nope/test") as resp:
            assert resp.status == 404 and resp.headers["X-Broker-Error"] == "no_route"

    async def test_admin_guard(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """With admin_token set, the test action needs it; without it nothing reaches the ERP."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, admin_token="operator-token-1"
        )
        await server.broker.wait_ready(5)
        async with http.post(f"{server.admin_url}/connectors/ifs/test") as resp:
            assert resp.status == 403 and resp.headers["X-Broker-Error"] == "forbidden"
        assert ifs_sim.count_token_requests() == 1
        headers = {"Authorization": "Bearer operator-token-1"}
        async with http.post(f"{server.admin_url}/connectors/ifs/test", headers=headers) as resp:
            assert resp.status == 200
