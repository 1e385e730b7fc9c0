"""Leak audit: a scripted session through a real broker process, then a search for secrets.

Everything the broker printed (stdout, stderr, at debug level), every admin answer, every error
body and the output of `check` and `status` must be free of every configured secret and of
every token the simulator ever issued.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from broker.sandbox import IfsApps10Sim

from .conftest import ifs_connector
from .procs import BrokerProcess, free_port


def issued_tokens(sim: IfsApps10Sim) -> list[str]:
    return list(sim._issued)


class TestLeakAudit:
    async def test_no_secret_or_token_anywhere(
        self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """Logins, refreshes, replays, failures, kill -9 and restart, every admin endpoint:
        no configured secret, access token or refresh token appears in any output."""
        secret_dir = tmp_path / "secrets"
        secret_dir.mkdir()
        (secret_dir / "password").write_text(ifs_sim.password + "\n")
        wrong_password = "Wr0ng-Passw0rd-Value"
        good = ifs_connector(
            ifs_sim,
            ca_file,
            password=f"${{file:{secret_dir / 'password'}}}",
            client_secret="${IFS_CLIENT_SECRET}",
        )
        bad = ifs_connector(ifs_sim, ca_file, password=wrong_password, route="/bad/")
        config: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": {"sqlite": str(tmp_path / "tokens.db")},
            "log_level": "debug",
            "connectors": {"ifs": good, "bad": bad},
        }
        env = {"IFS_CLIENT_SECRET": ifs_sim.client_secret}
        outputs: list[str] = []

        # Real OData calls: unlike the sandbox's echo route, they do not send the token back.
        api = "main/ifsapplications/projection/v1/CustomerHandling.svc/CustomerInfoSet"

        async def session(proc: BrokerProcess) -> None:
            async with aiohttp.ClientSession() as http:

                async def get(url: str, **kw: Any) -> None:
                    async with http.request(kw.pop("method", "GET"), url, **kw) as resp:
                        outputs.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

                await get(
                    f"{proc.proxy_url}/ifs/{api}",
                    headers={"Authorization": "Bearer app-sent-token-xyz"},
                )
                ifs_sim.queue_api_response(401)
                await get(
                    f"{proc.proxy_url}/ifs/{api}",
                    method="POST",
                    json={"CustomerId": "1", "Name": "n"},
                )
                ifs_sim.expire_all_tokens()
                await get(f"{proc.proxy_url}/ifs/{api}")
                ifs_sim.revoke_refresh_tokens()
                ifs_sim.expire_all_tokens()
                await get(f"{proc.proxy_url}/ifs/{api}")
                for _ in range(3):
                    await get(f"{proc.proxy_url}/bad/{api}")
                await get(f"{proc.proxy_url}/nope")
                for path in (
                    "/healthz",
                    "/readyz",
                    "/metrics",
                    "/connectors",
                    "/connectors/ifs",
                    "/connectors/bad",
                ):
                    await get(f"{proc.admin_url}{path}")
                await get(f"{proc.admin_url}/connectors/ifs/refresh", method="POST")
                await get(f"{proc.admin_url}/connectors/bad/refresh", method="POST")

        first = await BrokerProcess(config, tmp_path, env=env).start()
        try:
            await session(first)
            first.signal(signal.SIGKILL)
            await first.wait()
        finally:
            await first.kill()
        # A fixed admin port this time, so that `status` finds the broker from the config alone.
        config["admin_listen"] = f"127.0.0.1:{free_port()}"
        second = await BrokerProcess(config, tmp_path, env=env).start()
        try:
            await session(second)
            status = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "status",
                    "-c",
                    str(second.config_path),
                    "--format",
                    "json",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
                timeout=30,
            )
            assert status.returncode == 1, status.stderr  # connector "bad" is not up
            assert '"token_state"' in status.stdout
            outputs.append(status.stdout + status.stderr)
            second.signal(signal.SIGTERM)
            assert await second.wait() == 0
        finally:
            await second.kill()
        check = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "broker", "check", "-c", str(second.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        outputs += [first.output, second.output, check.stdout, check.stderr]
        everything = "\n".join(outputs)

        tokens = issued_tokens(ifs_sim)
        assert len(tokens) >= 8  # logins, refreshes and rotations happened
        secrets = [
            ifs_sim.password,
            ifs_sim.client_secret,
            wrong_password,
            "app-sent-token-xyz",
            *tokens,
        ]
        leaked = [s[:12] + "…" for s in secrets if s in everything]
        assert leaked == []
        # The session really ran: requests were logged, failures were reported.
        assert '"event":"request"' in first.output
        assert "credentials_rejected" in first.output
        assert ifs_sim.count_token_requests("refresh_token") >= 1


class TestLeakAuditRealWorld:
    async def test_new_paths_leak_nothing(
        self, tmp_path: Path, start_sim: Any, ca_file: str
    ) -> None:
        """client_credentials, Basic, token_params + id_token, PSO dead sessions in the 400
        style, MI_MODIFIED_ERROR, suspended logins with their causes, test-connection: no
        secret, token, session or Basic credential in any output."""
        import base64

        from broker.sandbox import PsoSim

        ifs = await start_sim(IfsApps10Sim(brute_force=True))
        native = await start_sim(IfsApps10Sim(native_resource="guid-9", id_token_only=True))
        pso = await start_sim(PsoSim(dead_session_style="400"))
        wrong = "Wr0ng-Passw0rd-Value-2"
        cc = ifs_connector(ifs, ca_file, auth="client_credentials", route="/cc/")
        del cc["username"], cc["password"]
        basic = ifs_connector(ifs, ca_file, auth="basic", route="/basic/")
        for key in ("client_id", "client_secret", "realm"):
            del basic[key]
        config: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": {"sqlite": str(tmp_path / "tokens.db")},
            "log_level": "debug",
            "connectors": {
                "cc": cc,
                "basic": basic,
                "native": ifs_connector(
                    native,
                    ca_file,
                    token_url="/openid-connect-provider/idp/token",
                    token_params={"resource": "guid-9"},
                    inject="id_token",
                ),
                "pso": {
                    "type": "ifs_pso",
                    "base_url": pso.url,
                    "account_id": pso.account_id,
                    "username": pso.username,
                    "password": pso.password,
                    "ca_file": ca_file,
                },
                "bad": ifs_connector(
                    ifs,
                    ca_file,
                    password=wrong,
                    route="/bad/",
                    login_backoff={"initial": 0.3, "max": 0.3, "max_failures": 2},
                ),
            },
        }
        outputs: list[str] = []
        api = "main/ifsapplications/projection/v1/AllProjections.svc/Projections"
        proc = await BrokerProcess(config, tmp_path).start()
        try:
            async with aiohttp.ClientSession() as http:

                async def get(url: str, method: str = "GET") -> None:
                    async with http.request(method, url) as resp:
                        outputs.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

                for route in ("cc", "native"):
                    await get(f"{proc.proxy_url}/{route}/{api}")
                ifs.mi_modified_errors = 1
                await get(f"{proc.proxy_url}/cc/{api}")
                await get(f"{proc.proxy_url}/basic/int/x")
                pso_data = "/pso/IFSSchedulingRESTfulGateway/api/v1/scheduling/resource"
                await get(f"{proc.proxy_url}{pso_data}")
                pso.expire_all_tokens()
                await get(f"{proc.proxy_url}{pso_data}")
                await proc.wait_for_event_count("credentials_rejected", 2, timeout=10)
                await get(f"{proc.proxy_url}/bad/{api}")
                for path in ("/connectors", "/metrics", "/readyz"):
                    await get(f"{proc.admin_url}{path}")
                for name in ("bad", "native", "basic"):
                    await get(f"{proc.admin_url}/connectors/{name}/test", "POST")
            cli = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "broker",
                    "test-connection",
                    "--all",
                    "-c",
                    str(proc.config_path),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            outputs.append(cli.stdout + cli.stderr)
            proc.signal(signal.SIGTERM)
            await proc.wait()
        finally:
            await proc.kill()
        outputs.append(proc.output)
        everything = "\n".join(outputs)
        assert "[invalid_credentials]" in cli.stdout  # test-connection shows the cause
        assert "may be locked by the identity provider" in everything
        basic_value = base64.b64encode(f"{ifs.username}:{ifs.password}".encode()).decode()
        secrets = [
            ifs.password,
            ifs.client_secret,
            native.client_secret,
            pso.password,
            wrong,
            basic_value,
            *issued_tokens(ifs),
            *issued_tokens(native),
            *list(pso._issued),
        ]
        leaked = [s[:12] + "…" for s in secrets if s in everything]
        assert leaked == []
        assert len(issued_tokens(native)) >= 2 and len(pso._issued) >= 2
