"""Footprint (issue 20): a running broker imports only what its config uses.

A fresh interpreter builds and starts the broker from a config (SQLite store, no
encryption_key, no Redis, no tracing) the way `erp-broker run` does, waits until every
connector is ready, and prints ``sys.modules``: the optional heavy modules must be absent.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import yaml

from broker.config import parse_config
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim
from broker.upstream import proxy_ssl_context
from tests.conftest import ifs_connector, infor_connector, offline_pso_connector, pso_connector
from tests.procs import BrokerProcess

#: Imported by a running broker only when its config (or a first request) asks for them.
NOT_NEEDED = (
    "redis",  # store.redis
    "cryptography",  # store.encryption_key
    "opentelemetry",  # tracing
    "broker.stores.redis",
    "broker.tracing",
    "broker.discovery",  # GET /connectors/<name>/openapi
    "broker.probe",  # POST /connectors/<name>/test
    "ctypes",  # malloc_trim, once a trim is due
    "aiohttp",  # both listeners are broker/server.py's, every request broker/client.py's
)

RUN = textwrap.dedent(
    """
    import asyncio, sys, orjson
    from broker.cli import main  # what `python -m broker` imports
    from broker.app import BrokerServer, tune_gc
    from broker.config import load_config
    from broker.runtime import Broker

    async def run() -> None:
        tune_gc()
        server = BrokerServer(Broker(load_config(sys.argv[1])))
        await server.start()
        try:
            await server.broker.wait_ready(30)
            print(orjson.dumps(sorted(sys.modules)).decode(), flush=True)
        finally:
            await server.stop()

    asyncio.run(run())
    """
)


async def modules_of_running_broker(
    config: dict[str, Any], workdir: Path, *, script: str = RUN
) -> set[str]:
    """``sys.modules`` as ``script`` (given the config file) prints it, in a fresh process."""
    path = workdir / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(path),
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    line = next(x for x in out.decode().splitlines() if x.startswith('["'))
    return set(orjson.loads(line))


async def test_a_sqlite_broker_imports_no_optional_heavy_module(
    ifs_sim: IfsApps10Sim, pso_sim: PsoSim, infor_sim: InforIonSim, ca_file: str, tmp_path: Path
) -> None:
    config = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "connectors": {
            "ifs": ifs_connector(ifs_sim, ca_file),
            "pso": pso_connector(pso_sim, ca_file),
            "infor": infor_connector(infor_sim, ca_file),
        },
    }
    modules = await modules_of_running_broker(config, tmp_path)
    assert "broker.stores.sqlite" in modules and "broker.client" in modules  # it did run
    loaded = sorted(
        name for name in modules if any(name == m or name.startswith(m + ".") for m in NOT_NEEDED)
    )
    assert loaded == []


async def test_erp_broker_run_never_imports_aiohttp(
    ifs_sim: IfsApps10Sim, pso_sim: PsoSim, infor_sim: InforIonSim, ca_file: str, tmp_path: Path
) -> None:
    """`erp-broker run` itself, three connectors, with Python's import log on
    (``PYTHONPROFILEIMPORTTIME``, as ``-X importtime``): from start to stop, its admin
    endpoints and the status page served, no module of aiohttp is ever imported: both
    listeners are broker/server.py's, every request to an ERP broker/client.py's."""
    config = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "grace_period": 1,
        "connectors": {
            "ifs": ifs_connector(ifs_sim, ca_file),
            "pso": pso_connector(pso_sim, ca_file),
            "infor": infor_connector(infor_sim, ca_file),
        },
    }
    proc = await BrokerProcess(config, tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}).start()
    try:
        await proc.wait_for_event_count("token_obtained", 3, timeout=30)
        reader, writer = await asyncio.open_connection(*proc.admin_url[7:].rsplit(":", 1))
        for path in ("/readyz", "/metrics", "/connectors", "/", "/nope"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        writer.write(b"POST /quitquitquit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert answers.count(b"HTTP/1.1 200 ") == 5 and answers.count(b"HTTP/1.1 404 ") == 1
        assert await proc.wait() == 0
    finally:
        await proc.kill()
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "broker.admin" in imported and "broker.server" in imported  # the log is complete
    assert [name for name in imported if name.strip().startswith("aiohttp")] == []


def test_connectors_on_the_system_cas_share_one_context(ca_file: str) -> None:
    """Each verifying context on the system CAs holds its own copy of the CA store (~0.8 MiB):
    the proxy's pools of all connectors that use them share one; a ca_file gets its own."""
    config = parse_config(
        {
            "store": {"sqlite": "unused.db"},
            "connectors": {
                "a": offline_pso_connector(base_url="https://a.example"),
                "b": offline_pso_connector(base_url="https://b.example"),
                "c": offline_pso_connector(base_url="https://c.example", ca_file=ca_file),
            },
        }
    )
    a, b, c = (proxy_ssl_context(config.connectors[n]) for n in ("a", "b", "c"))
    assert a is b
    assert a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname
    assert a.cert_store_stats()["x509_ca"] == len(ssl.create_default_context().get_ca_certs())
    assert c is not a and c.cert_store_stats()["x509_ca"] == 1
