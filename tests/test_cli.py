"""The command line, run as users run it: `erp-broker run`, `check`, signals, logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.sandbox import IfsApps10Sim

from .conftest import ifs_connector
from .procs import BrokerProcess


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def base_config(tmp_path: Path, connectors: dict[str, Any]) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "grace_period": 5,
        "connectors": connectors,
    }


class TestCheck:
    def test_valid_config_prints_masked(self, tmp_path: Path) -> None:
        """check exits 0 and prints the effective config with secrets masked."""
        (tmp_path / "pw").write_text("file-password-value\n")
        path = tmp_path / "b.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "connectors": {
                        "ifs": {
                            "type": "ifs_apps10",
                            "domain": "erp.example.com",
                            "realm": "r",
                            "client_id": "c",
                            "client_secret": "${IFS_SECRET}",
                            "username": "u",
                            "password": f"${{file:{tmp_path / 'pw'}}}",
                        }
                    }
                }
            )
        )
        result = cli("check", "-c", str(path), env={"IFS_SECRET": "env-secret-value"})
        assert result.returncode == 0, result.stderr
        assert "file-password-value" not in result.stdout + result.stderr
        assert "env-secret-value" not in result.stdout + result.stderr
        printed = yaml.safe_load(result.stdout)
        assert printed["connectors"]["ifs"]["password"] == "***"
        assert printed["connectors"]["ifs"]["route"] == "/ifs/"
        assert printed["listen"] == "127.0.0.1:8080"

    def test_bad_config_exits_2_with_key_paths(self, tmp_path: Path) -> None:
        """check exits 2 with one line per problem, each naming file and key path."""
        path = tmp_path / "b.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "connectors": {
                        "ifs": {
                            "type": "ifs_apps10",
                            "domain": "https://erp.example.com/",
                            "realm": "r",
                            "client_id": "c",
                            "client_secret": "${NOT_SET_ANYWHERE}",
                            "username": "u",
                            "password": "p",
                            "extra": 1,
                        }
                    }
                }
            )
        )
        result = cli("check", "-c", str(path))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 3
        assert all(line.startswith(f"{path}: connectors.ifs.") for line in lines)
        assert "Traceback" not in result.stderr

    def test_config_path_from_environment_and_default(self, tmp_path: Path) -> None:
        """Without -c: $ERP_BROKER_CONFIG, else ./config/broker.yaml (named when missing)."""
        result = cli("check", cwd=tmp_path, env={"ERP_BROKER_CONFIG": ""})
        assert result.returncode == 2
        assert "./config/broker.yaml: cannot read the config" in result.stderr
        result = cli("check", cwd=tmp_path, env={"ERP_BROKER_CONFIG": str(tmp_path / "x.yaml")})
        assert f"{tmp_path / 'x.yaml'}: cannot read" in result.stderr

    def test_shipped_example_config_is_valid(self, tmp_path: Path) -> None:
        """config/broker.yaml validates once its secrets exist."""
        example = Path(__file__).parent.parent / "config" / "broker.yaml"
        text = example.read_text()
        secrets = tmp_path / "secrets"
        for rel in ("ifs/client_secret", "ifs/password", "pso/password"):
            (secrets / rel).parent.mkdir(parents=True, exist_ok=True)
            (secrets / rel).write_text("value-x\n")
        ionapi = secrets / "infor" / "prod.ionapi"
        ionapi.parent.mkdir(parents=True, exist_ok=True)
        ionapi.write_text(
            '{"ti":"T","ci":"c","cs":"s","iu":"https://gw","pu":"https://sso/T/as/","ot":"token.oauth2","or":"revoke_token.oauth2","saak":"a","sask":"b"}'
        )
        path = tmp_path / "b.yaml"
        path.write_text(text.replace("/secrets/", f"{secrets}/"))
        result = cli("check", "-c", str(path), env={"IFS_CLIENT_ID": "cid", "IFS_USER": "user"})
        assert result.returncode == 0, result.stderr


class TestRun:
    async def test_bad_config_exits_2_before_listening(self, tmp_path: Path) -> None:
        """run with a bad config exits 2 and never listens."""
        path = tmp_path / "b.yaml"
        path.write_text("connectors: {}\n")
        result = cli("run", "-c", str(path))
        assert result.returncode == 2
        assert "connectors" in result.stderr

    async def test_unopenable_store_is_a_startup_error(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """A store path that cannot be created: exit 2 with a message naming the store."""
        (tmp_path / "file").write_text("x")
        config = base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)})
        config["store"] = {"sqlite": str(tmp_path / "file" / "tokens.db")}
        path = tmp_path / "b.yaml"
        path.write_text(yaml.safe_dump(config))
        result = await asyncio.to_thread(cli, "run", "-c", str(path))
        assert result.returncode == 2
        assert "cannot open the token store" in result.stderr

    async def test_sigterm_finishes_inflight_requests(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """SIGTERM: readiness fails, the in-flight request completes, the process exits 0."""
        proc = await BrokerProcess(
            base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)}), tmp_path
        ).start()
        try:
            async with aiohttp.ClientSession() as http:
                slow = asyncio.create_task(http.get(f"{proc.proxy_url}/ifs/_test/slow/1"))
                await ifs_sim.wait_for_api_requests(1)
                proc.signal(signal.SIGTERM)
                response = await slow
                assert response.status == 200
                response.release()
                assert await proc.wait() == 0
                with pytest.raises(aiohttp.ClientConnectionError):
                    await http.get(f"{proc.proxy_url}/ifs/_test/echo/x")
        finally:
            await proc.kill()
        events = [e["event"] for e in proc.events]
        assert events.index("draining") < events.index("broker_stopped")

    async def test_quitquitquit_stops_the_broker(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """POST /quitquitquit on the admin listener shuts down gracefully (for Jobs)."""
        proc = await BrokerProcess(
            base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)}), tmp_path
        ).start()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{proc.admin_url}/quitquitquit") as resp,
            ):
                assert resp.status == 200
            assert await proc.wait() == 0
        finally:
            await proc.kill()

    async def test_request_log_lines(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """One JSON line per proxied request with connector, method, status, duration, attempts."""
        proc = await BrokerProcess(
            base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)}), tmp_path
        ).start()
        try:
            async with aiohttp.ClientSession() as http:
                ifs_sim.queue_api_response(401)
                async with http.post(
                    f"{proc.proxy_url}/ifs/_test/echo/x",
                    data=b"{}",
                    headers={"X-Request-ID": "abc-1"},
                ) as resp:
                    assert resp.status == 200
            proc.signal(signal.SIGTERM)
            await proc.wait()
        finally:
            await proc.kill()
        requests = [e for e in proc.events if e.get("event") == "request"]
        assert len(requests) == 1
        line = requests[0]
        assert (
            line["connector"],
            line["method"],
            line["status"],
            line["attempts"],
            line["request_id"],
        ) == ("ifs", "POST", 200, 2, "abc-1")
        assert line["duration_ms"] > 0 and line["level"] == "info" and "timestamp" in line
        assert any(e.get("event") == "token_obtained" for e in proc.events)


class TestStatus:
    async def test_table_from_a_running_broker(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """status prints one row per connector with its token state, read from admin_listen."""
        from .procs import free_port

        config = base_config(tmp_path, {"ifs": ifs_connector(ifs_sim, ca_file)})
        config["admin_listen"] = f"127.0.0.1:{free_port()}"
        proc = await BrokerProcess(config, tmp_path).start()
        try:
            await proc.wait_for_event("token_obtained")
            result = await asyncio.to_thread(cli, "status", "-c", str(proc.config_path))
        finally:
            proc.signal(signal.SIGTERM)
            await proc.wait()
        assert result.returncode == 0, result.stderr
        header, row = result.stdout.splitlines()
        assert header.split()[:5] == ["CONNECTOR", "TYPE", "ROUTE", "UPSTREAM", "TOKEN"]
        assert row.split()[:5] == ["ifs", "ifs_apps10", "/ifs/", "localhost", "valid"]

    def test_no_broker_running(self, tmp_path: Path) -> None:
        """With nothing on admin_listen, status exits 1 and says where it looked."""
        from .procs import free_port

        port = free_port()
        path = tmp_path / "b.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "admin_listen": f"127.0.0.1:{port}",
                    "connectors": {
                        "ifs": {
                            "type": "ifs_apps10",
                            "domain": "erp.example.com",
                            "realm": "r",
                            "client_id": "c",
                            "client_secret": "s",
                            "username": "u",
                            "password": "p",
                        }
                    },
                }
            )
        )
        result = cli("status", "-c", str(path))
        assert result.returncode == 1
        assert f"127.0.0.1:{port}" in result.stderr
