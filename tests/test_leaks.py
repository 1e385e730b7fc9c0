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
    async def test_no_secret_or_token_anywhere(self, tmp_path: Path, ifs_sim: IfsApps10Sim, ca_file: str) -> None:
        """Logins, refreshes, replays, failures, kill -9 and restart, every admin endpoint:
        no configured secret, access token or refresh token appears in any output."""
        secret_dir = tmp_path / "secrets"
        secret_dir.mkdir()
        (secret_dir / "password").write_text(ifs_sim.password + "\n")
        wrong_password = "Wr0ng-Passw0rd-Value"
        good = ifs_connector(ifs_sim, ca_file, password=f"${{file:{secret_dir / 'password'}}}", client_secret="${IFS_CLIENT_SECRET}")
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

                await get(f"{proc.proxy_url}/ifs/{api}", headers={"Authorization": "Bearer app-sent-token-xyz"})
                ifs_sim.queue_api_response(401)
                await get(f"{proc.proxy_url}/ifs/{api}", method="POST", json={"CustomerId": "1", "Name": "n"})
                ifs_sim.expire_all_tokens()
                await get(f"{proc.proxy_url}/ifs/{api}")
                ifs_sim.revoke_refresh_tokens()
                ifs_sim.expire_all_tokens()
                await get(f"{proc.proxy_url}/ifs/{api}")
                for _ in range(3):
                    await get(f"{proc.proxy_url}/bad/{api}")
                await get(f"{proc.proxy_url}/nope")
                for path in ("/healthz", "/readyz", "/metrics", "/connectors", "/connectors/ifs", "/connectors/bad"):
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
                [sys.executable, "-m", "broker", "status", "-c", str(second.config_path), "--format", "json"],
                capture_output=True, text=True, env={**os.environ, **env}, timeout=30,
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
            capture_output=True, text=True, env={**os.environ, **env}, timeout=30,
        )
        assert check.returncode == 0, check.stderr
        outputs += [first.output, second.output, check.stdout, check.stderr]
        everything = "\n".join(outputs)

        tokens = issued_tokens(ifs_sim)
        assert len(tokens) >= 8  # logins, refreshes and rotations happened
        secrets = [ifs_sim.password, ifs_sim.client_secret, wrong_password, "app-sent-token-xyz", *tokens]
        leaked = [s[:12] + "…" for s in secrets if s in everything]
        assert leaked == []
        # The session really ran: requests were logged, failures were reported.
        assert '"event":"request"' in first.output
        assert "credentials_rejected" in first.output
        assert ifs_sim.count_token_requests("refresh_token") >= 1
