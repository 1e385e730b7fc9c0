"""`erp-broker demo`: simulators of all three ERPs and a broker wired to them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .app import Broker, BrokerServer
from .config import Config, parse_config
from .sandbox import Sandboxes, start_all

READY_TIMEOUT = 15.0


def demo_config(sandboxes: Sandboxes, listen: str, admin_listen: str, store: Path) -> Config:
    """A config pointing one connector of each kind at the simulators (via base_url)."""
    ifs, pso, infor = sandboxes.ifs, sandboxes.pso, sandboxes.infor
    data: dict[str, Any] = {
        "listen": listen,
        "admin_listen": admin_listen,
        "store": {"sqlite": str(store)},
        "grace_period": 2,
        "connectors": {
            "ifs": {
                "type": "ifs_apps10",
                "base_url": ifs.url,
                "realm": ifs.realm,
                "client_id": ifs.client_id,
                "client_secret": ifs.client_secret,
                "username": ifs.username,
                "password": ifs.password,
            },
            "pso": {
                "type": "ifs_pso",
                "base_url": pso.url,
                "account_id": pso.account_id,
                "username": pso.username,
                "password": pso.password,
            },
            "infor": {"type": "infor_ion", "ionapi": infor.ionapi()},
        },
    }
    return parse_config(data, source="<demo>")


def curl_lines(proxy: str, admin: str, sandboxes: Sandboxes) -> str:
    tenant = sandboxes.infor.tenant
    ifs, pso = sandboxes.ifs.url, sandboxes.pso.url
    projection = "main/ifsapplications/projection/v1"
    return f"""
erp-broker demo is running: three simulated ERPs behind one broker.

  proxy  {proxy}    (apps point their base URL at {proxy}/<route>/)
  admin  {admin}

Try these (the broker adds the credential; you send none):

  # IFS Applications 10 (OAuth2 on Keycloak, Bearer)
  curl -s '{proxy}/ifs/{projection}/AllProjections.svc/Projections'
  curl -s "{proxy}/ifs/{projection}/CustomerHandling.svc/CustomerInfoSet(CustomerId='10%2F7')"
  curl -s '{proxy}/ifs/{projection}/CustomerHandling.svc/CustomerInfoSet?$top=2'

  # IFS PSO (session token, apiKey header)
  curl -s '{proxy}/pso/IFSSchedulingRESTfulGateway/api/v1/scheduling/data'

  # Infor ION API Gateway (OAuth2 with service-account keys, Bearer; tenant {tenant} added)
  curl -s '{proxy}/infor/ifsservice/usermgt/v2/users/me'

  # The admin listener
  curl -s {admin}/readyz
  curl -s {admin}/connectors
  curl -s {admin}/metrics | grep '^erp_broker_token'
  curl -s -X POST {admin}/connectors/ifs/refresh
  curl -s {admin}/connectors/ifs/openapi | head -40
  curl -s -X POST {admin}/connectors/infor/test

Make the ERPs behave as real ones do (simulator switches, see broker/sandbox/), and watch:

  # PSO forgets its sessions and says so with 400 AUTHENTICATION_FAILED: one login, one replay
  curl -s -X POST '{pso}/_sandbox/switches?dead_session_style=400'
  curl -s -X POST {pso}/_sandbox/expire
  curl -s '{proxy}/pso/IFSSchedulingRESTfulGateway/api/v1/scheduling/resource'
  curl -s {admin}/metrics | grep 'erp_broker_retries_total{{connector="pso",reason="auth"}} [1-9]'

  # Keycloak disables the service user: the broker pauses logins instead of hammering it;
  # {admin}/connectors shows last_error.cause "account_disabled" and what to check
  curl -s -X POST '{ifs}/_sandbox/switches?user_enabled=false&brute_force=true'
  curl -s -X POST {ifs}/_sandbox/expire
  # …then enable the user again: the broker logs in after login_backoff.initial (30 s)
  curl -s -X POST '{ifs}/_sandbox/switches?user_enabled=true'

Press Ctrl-C to stop.
"""


async def run_demo(listen: str, admin_listen: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="erp-broker-demo-") as tmp:
        sandboxes = await start_all()
        try:
            config = demo_config(sandboxes, listen, admin_listen, Path(tmp) / "tokens.db")
            server = BrokerServer(Broker(config))
            await server.start()
            try:
                with contextlib.suppress(TimeoutError):
                    await server.broker.wait_ready(READY_TIMEOUT)
                print(curl_lines(server.proxy_url, server.admin_url, sandboxes), flush=True)
                quit_ = asyncio.ensure_future(server.broker.shutdown_requested.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({quit_, stopper}, return_when=asyncio.FIRST_COMPLETED)
                quit_.cancel()
                stopper.cancel()
            finally:
                await server.stop()
        finally:
            await sandboxes.stop()
    print("erp-broker demo stopped.", file=sys.stderr)
    return 0
