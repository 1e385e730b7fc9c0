"""kill -9 at the worst moment loses nothing: the newest (rotated) refresh token survives."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import aiohttp

from broker.sandbox import IfsApps10Sim

from .conftest import SimStarter, ifs_connector
from .procs import BrokerProcess


class TestKillNine:
    async def test_restart_after_rotation_uses_the_newest_refresh_token(
        self, tmp_path: Path, start_sim: SimStarter[IfsApps10Sim], ca_file: str
    ) -> None:
        """Killed right after a refresh token rotated, the restarted broker refreshes with the
        newest one (accepted by the ERP) and never needs a password login."""
        sim = await start_sim(IfsApps10Sim(rotate_refresh=True, token_lifetime=2))
        config: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "store": {"sqlite": str(tmp_path / "tokens.db")},
            "connectors": {"ifs": ifs_connector(sim, ca_file)},
        }
        first = await BrokerProcess(config, tmp_path).start()
        try:
            # Login, then two background rotations; kill the moment the second is in use.
            await sim.wait_for_token_requests(3, grant=None, timeout=10)
            await first.wait_for_event_count("token_obtained", 3)
            first.signal(signal.SIGKILL)
            await first.wait()
        finally:
            await first.kill()
        before = len(sim.token_requests)
        sim.expire_all_tokens()  # the stored access token is dead: a refresh is needed
        second = await BrokerProcess(config, tmp_path).start()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{second.proxy_url}/ifs/_test/echo/x") as resp,
            ):
                assert resp.status == 200
        finally:
            second.signal(signal.SIGTERM)
            await second.wait()
        after = sim.token_requests[before:]
        assert after, "the restarted broker made no token request"
        assert after[0].grant == "refresh_token" and after[0].status == 200
        assert sim.count_token_requests("password") == 1  # only the very first login
        # No refresh token was ever presented twice.
        sent = [r.form["refresh_token"] for r in sim.token_requests if r.grant == "refresh_token"]
        assert len(sent) == len(set(sent))
