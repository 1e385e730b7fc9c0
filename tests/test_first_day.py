"""A newcomer's first hour and an operator's first day: what they hit early (issue 16)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from broker.sandbox import IfsApps10Sim

from .conftest import ifs_connector
from .procs import BrokerProcess, free_port
from .test_cli import base_config, cli

IFS = {
    "type": "ifs_apps10",
    "realm": "r",
    "client_id": "c",
    "client_secret": "s",
    "username": "u",
    "password": "p",
}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class TestCheckReportsEverything:
    def test_three_problems_in_three_places_three_lines(self, tmp_path: Path) -> None:
        """An unterminated ${NAME, a bad key in another connector and a route clash (which the
        config's own check could not see while the other two failed): three lines, one run."""
        path = write(
            tmp_path,
            {
                "connectors": {
                    "ifs": {**IFS, "domain": "erp.example.com", "client_secret": "${IFS_SECRET"},
                    "pso": {
                        "type": "ifs_pso",
                        "base_url": "ftp://pso.example.com",
                        "account_id": "A",
                        "username": "u",
                        "password": "p",
                    },
                    "more": {**IFS, "domain": "erp2.example.com", "route": "/ifs/"},
                }
            },
        )
        result = cli("check", "-c", str(path), env={"IFS_SECRET": "never-used"})
        assert result.returncode == 2, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 3, lines
        assert lines[0].startswith(
            f"{path}: connectors.ifs.client_secret: a reference is not closed"
        )
        assert lines[1].startswith(
            f"{path}: connectors.pso.base_url: base_url must be a full http(s) URL"
        )
        assert lines[2] == f"{path}: connectors: connectors ifs and more both use route /ifs/"
        assert "never-used" not in result.stderr

    def test_a_connector_s_own_check_runs_beside_a_bad_key(self, tmp_path: Path) -> None:
        """A bad domain does not hide that realm/token_url is missing in the same connector."""
        ifs = {**IFS, "domain": "https://erp.example.com"}
        del ifs["realm"]
        result = cli("check", "-c", str(write(tmp_path, {"connectors": {"ifs": ifs}})))
        assert result.returncode == 2
        assert [line.split(": ")[1] for line in result.stderr.strip().splitlines()] == [
            "connectors.ifs.domain",
            "connectors.ifs",
        ]
        assert "set realm (the Keycloak realm) or token_url" in result.stderr

    def test_both_of_a_pair_is_a_warning_saying_which_wins(self, tmp_path: Path) -> None:
        """domain+base_url and realm+token_url: valid, with a warning naming the winner."""
        path = write(
            tmp_path,
            {
                "connectors": {
                    "ifs": {
                        **IFS,
                        "domain": "erp.example.com",
                        "base_url": "https://onprem.example.com",
                        "token_url": "https://sso.example.com/token",
                    }
                }
            },
        )
        result = cli("check", "-c", str(path))
        assert result.returncode == 0, result.stderr
        warnings = result.stderr.strip().splitlines()
        assert warnings == [
            f"warning: {path}: connectors.ifs: both domain and base_url are set: base_url wins (https://onprem.example.com); domain is ignored",
            f"warning: {path}: connectors.ifs: both realm and token_url are set: token_url wins (https://sso.example.com/token); realm is ignored",
        ]

    def test_ionapi_file_is_shown_as_its_path(self, tmp_path: Path) -> None:
        """check prints the .ionapi file's path, not its content (masked or not)."""
        ionapi = tmp_path / "prod.ionapi"
        ionapi.write_text(
            json.dumps(
                {
                    "ti": "TENANT_X",
                    "ci": "c",
                    "cs": "client-secret-x",
                    "iu": "https://gw",
                    "pu": "https://sso/T/as/",
                    "ot": "token.oauth2",
                    "or": "revoke_token.oauth2",
                    "saak": "access-key-x",
                    "sask": "secret-key-x",
                }
            )
        )
        result = cli(
            "check",
            "-c",
            str(
                write(
                    tmp_path,
                    {"connectors": {"infor": {"type": "infor_ion", "ionapi_file": str(ionapi)}}},
                )
            ),
        )
        assert result.returncode == 0, result.stderr
        printed = yaml.safe_load(result.stdout)
        assert printed["connectors"]["infor"]["ionapi_file"] == str(ionapi)
        assert "TENANT_X" not in result.stdout and "secret-key-x" not in result.stdout


class TestStatusExitCode:
    async def test_paused_connector_exits_1_with_the_whole_cause(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """A connector whose login was rejected: status exits 1 and prints its error whole."""
        config = base_config(
            tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file, password="wrong-password-1")}
        )
        config["admin_listen"] = f"127.0.0.1:{free_port()}"
        proc = await BrokerProcess(config, tmp_path).start()
        try:
            await proc.wait_for_event("credentials_rejected", timeout=20)
            result = await asyncio.to_thread(cli, "status", "-c", str(proc.config_path))
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{proc.admin_url}/connectors") as resp,
            ):
                last_error = (await resp.json())["ifs"]["last_error"]
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()
        assert result.returncode == 1, result.stdout
        message = last_error["message"]
        assert len(message) > 60
        assert f"ifs: last error: [{last_error['cause']}] {message}" in result.stdout.splitlines()
        assert result.stdout.splitlines()[1].split()[-1] == "no"
        assert "not up: ifs" in result.stderr
        assert "wrong-password-1" not in result.stdout + result.stderr


class TestStartup:
    async def test_port_clash_fails_before_any_login(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """The proxy port is taken: one line naming it, non-zero exit, no token request."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)})
            config["listen"] = f"127.0.0.1:{port}"
            result = await asyncio.to_thread(cli, "run", "-c", str(write(tmp_path, config)))
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == [
            f"error: listen: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]
        assert ifs_sim.count_token_requests() == 0

    async def test_listen_flags_override_the_config(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """`run --listen/--admin-listen` (a container's 0.0.0.0) replace the config's."""
        port, admin = free_port(), free_port()
        config = base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)})
        path = write(tmp_path, config)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "run",
            "-c",
            str(path),
            "--log-format",
            "json",
            "--listen",
            f"0.0.0.0:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(20):
                async for raw in proc.stdout:
                    event = json.loads(raw)
                    if event.get("event") == "broker_started":
                        break
            assert event["listen"] == f"http://127.0.0.1:{port}"
            assert event["admin_listen"] == f"http://127.0.0.1:{admin}"
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await proc.communicate()

    async def test_first_login_is_not_logged_as_refresh_ahead(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """The token obtained at start says why: startup, not refresh_ahead."""
        proc = await BrokerProcess(
            base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)}), tmp_path
        ).start()
        try:
            first = await proc.wait_for_event("token_obtained", timeout=20)
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()
        assert first["reason"] == "startup"


class TestSmallThings:
    async def test_admin_404_and_405_are_json_errors_without_framework_name(
        self, make_broker: Any, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """Admin's unknown path and wrong method: the broker's JSON error shape; every admin
        answer says `Server: erp-broker`, never the framework's name."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.admin_url}/nope") as resp:
                assert resp.status == 404
                assert resp.content_type == "application/json"
                assert (await resp.json())["error"]["code"] == "not_found"
                assert resp.headers["Server"] == "erp-broker"
            async with http.delete(f"{server.admin_url}/healthz") as resp:
                assert resp.status == 405
                body = await resp.json()
                assert body["error"]["code"] == "method_not_allowed"
                assert set(body["error"]) == {"code", "message", "connector"}
                assert "GET" in resp.headers["Allow"]
            for path in ("/healthz", "/metrics", "/connectors"):
                async with http.get(f"{server.admin_url}{path}") as resp:
                    assert resp.headers["Server"] == "erp-broker", path

    async def test_route_without_trailing_slash_is_never_forwarded(
        self, make_broker: Any, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """`/ifs` (no slash): 404 no_route from the broker, nothing reaches the ERP."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with aiohttp.ClientSession() as http:
            for path in ("/ifs", "/ifs?x=1"):
                async with http.get(f"{server.proxy_url}{path}") as resp:
                    assert resp.status == 404
                    assert resp.headers["X-Broker-Error"] == "no_route"
                    assert "aiohttp" not in resp.headers.get("Server", "")
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
                assert resp.status == 200
        assert len(ifs_sim.api_requests) == 1  # the echo only
