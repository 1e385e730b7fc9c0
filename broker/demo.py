"""`erp-broker demo`: simulators of all three ERPs and a broker wired to them.

The demo writes its config to a file it names, so that every other command (`status`,
`test-connection`, `discover`, `check`) can be tried against it as printed. Its default ports
are 8080 and 9090; when one is taken, a free port is used and the demo says so. A port given
with ``--listen``/``--admin-listen`` is used as given, or the demo fails in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml

from .app import BrokerServer
from .config import DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, _parse_hostport, parse_config
from .errors import BrokerError
from .ports import is_free
from .runtime import Broker
from .sandbox import Sandboxes, start_all

READY_TIMEOUT = 15.0
LAST_LINE = "Press Ctrl-C to stop."


class DemoPortError(BrokerError):
    """A port given on the command line cannot be listened on."""


def demo_data(
    sandboxes: Sandboxes, listen: str, admin_listen: str, workdir: Path
) -> dict[str, Any]:
    """A config pointing one connector of each kind at the simulators (via base_url)."""
    ifs, pso, infor = sandboxes.ifs, sandboxes.pso, sandboxes.infor
    ionapi = workdir / "demo.ionapi"
    ionapi.write_bytes(orjson.dumps(infor.ionapi(), option=orjson.OPT_INDENT_2))
    ionapi.chmod(0o600)
    return {
        "listen": listen,
        "admin_listen": admin_listen,
        "store": {"sqlite": str(workdir / "tokens.db")},
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
            "infor": {"type": "infor_ion", "ionapi_file": str(ionapi)},
        },
    }


def _choose(given: str | None, default: str, flag: str, notes: list[str]) -> str:
    """The address to listen on: as given, else the default, else a free port (said so)."""
    if given is not None:
        try:
            host, port = _parse_hostport(given, flag)
        except ValueError as exc:
            raise DemoPortError(f"demo: {exc}") from None
        if port and not is_free(host, port):
            raise DemoPortError(
                f"demo: port {port} on {host} is taken: choose another with {flag} HOST:PORT"
            )
        return given
    host, port = _parse_hostport(default, flag)
    if is_free(host, port):
        return default
    notes.append(f"note: port {port} is taken; a free port is used instead (or pass {flag})")
    return f"{host}:0"


def intro_lines(proxy: str, admin: str) -> list[str]:
    """Where the demo listens. (Lines may be put in front, e.g. a status page's URL.)"""
    return [
        "erp-broker demo is running: three simulated ERPs behind one broker.",
        "",
        f"  proxy  {proxy}    (apps point their base URL at {proxy}/<route>/)",
        f"  admin  {admin}",
    ]


def curl_lines(proxy: str, admin: str, sandboxes: Sandboxes) -> list[str]:
    tenant = sandboxes.infor.tenant
    ifs, pso = sandboxes.ifs.url, sandboxes.pso.url
    projection = "main/ifsapplications/projection/v1"
    customers = f"{proxy}/ifs/{projection}/CustomerHandling.svc/CustomerInfoSet"
    return f"""Try these (the broker adds the credential; you send none):

  # IFS Applications 10 (OAuth2 on Keycloak, Bearer)
  curl -s '{proxy}/ifs/{projection}/AllProjections.svc/Projections'
  curl -s "{proxy}/ifs/{projection}/CustomerHandling.svc/CustomerInfoSet(CustomerId='10%2F7')"
  curl -s '{proxy}/ifs/{projection}/CustomerHandling.svc/CustomerInfoSet?$top=2'
  # server-driven paging: follow @odata.nextLink, it leads back through the broker
  curl -s -H 'Prefer: odata.maxpagesize=1' '{customers}'

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
  curl -s -X POST '{ifs}/_sandbox/switches?user_enabled=true'""".splitlines()


def command_lines(config_file: Path) -> list[str]:
    """The command line against this demo: its config is a file like any other."""
    c = shlex.quote(str(config_file))
    return [
        f"The demo's config is {config_file}; the other commands work against it:",
        "",
        f"  erp-broker check -c {c}",
        f"  erp-broker status -c {c}",
        f"  erp-broker test-connection --all -c {c}",
        f"  erp-broker test-connection ifs -v -c {c}",
        f"  erp-broker discover ifs -c {c}",
    ]


def demo_lines(
    proxy: str, admin: str, sandboxes: Sandboxes, config_file: Path, notes: list[str]
) -> list[str]:
    """Everything the demo prints once it is ready, in order: the status page first."""
    return [
        f"Status page: {admin}/",
        "",
        *notes,
        *([""] if notes else []),
        *intro_lines(proxy, admin),
        "",
        *curl_lines(proxy, admin, sandboxes),
        "",
        *command_lines(config_file),
        "",
        LAST_LINE,
    ]


def _write_config(path: Path, data: dict[str, Any]) -> None:
    header = "# Written by `erp-broker demo`: simulated ERPs on loopback; gone when it stops.\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(header + yaml.safe_dump(data, sort_keys=False))


async def run_demo(listen: str | None, admin_listen: str | None) -> int:
    notes: list[str] = []
    listen = _choose(listen, DEFAULT_LISTEN, "--listen", notes)
    admin_listen = _choose(admin_listen, DEFAULT_ADMIN_LISTEN, "--admin-listen", notes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="erp-broker-demo-") as tmp:
        workdir = Path(tmp)
        config_file = workdir / "broker.yaml"
        sandboxes = await start_all()
        try:
            data = demo_data(sandboxes, listen, admin_listen, workdir)
            config = parse_config(data, source=str(config_file))
            server = BrokerServer(Broker(config))
            await server.start()
            try:
                # The file says where the broker really listens (a port 0 is now known).
                host, _ = config.listen_address
                admin_host, _ = config.admin_address
                data["listen"] = f"{host}:{server.proxy_port}"
                data["admin_listen"] = f"{admin_host}:{server.admin_port}"
                _write_config(config_file, data)
                with contextlib.suppress(TimeoutError):
                    await server.broker.wait_ready(READY_TIMEOUT)
                lines = demo_lines(
                    server.proxy_url, server.admin_url, sandboxes, config_file, notes
                )
                print("\n".join(lines), flush=True)
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
