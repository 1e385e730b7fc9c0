"""Audit in the access log: the ERP operation and the id of the credential that was injected.

Access lines are read from real requests through a broker to the simulators of all three
ERPs; the parsing of paths into operations is also checked on its own (``broker/audit.py``).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import structlog
from yarl import URL

from broker.app import BrokerServer
from broker.audit import MAX_FIELD, Operation, credential_id, operation_of
from broker.config import fingerprint, parse_config
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim

from .conftest import (
    BrokerFactory,
    ifs_connector,
    infor_connector,
    offline_pso_connector,
    pso_connector,
)

ODATA = "main/ifsapplications/projection/v1/CustomerHandling.svc"


async def access_line(
    http: aiohttp.ClientSession, server: BrokerServer, path: str, **kwargs: Any
) -> dict[str, Any]:
    """Send one request; return its access-log line."""
    with structlog.testing.capture_logs() as logs:
        async with http.request(
            kwargs.pop("method", "GET"), URL(f"{server.proxy_url}{path}", encoded=True), **kwargs
        ) as resp:
            await resp.read()
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    return line


class TestOperationOf:
    @pytest.mark.parametrize(
        ("rest", "expected"),
        [
            (
                f"{ODATA}/CustomerInfoSet(CustomerId='10%2F7')",
                Operation("CustomerInfoSet", "CustomerId='10%2F7'", "CustomerHandling"),
            ),
            (f"{ODATA}/CustomerInfoSet", Operation("CustomerInfoSet", None, "CustomerHandling")),
            (
                f"{ODATA}/CustomerInfoSet(CustomerId='1')/Addresses",
                Operation("CustomerInfoSet/Addresses", "CustomerId='1'", "CustomerHandling"),
            ),
            (
                f"{ODATA}/CustomerInfoSet(CustomerId='1')/IfsApp.CustomerHandling.Approve",
                Operation(
                    "CustomerInfoSet/IfsApp.CustomerHandling.Approve",
                    "CustomerId='1'",
                    "CustomerHandling",
                ),
            ),
            (
                f"{ODATA}/GetCreditLimit(CustomerId='1',Currency='EUR')",
                Operation("GetCreditLimit", "CustomerId='1',Currency='EUR'", "CustomerHandling"),
            ),
            (f"{ODATA}/$metadata", Operation("$metadata", None, "CustomerHandling")),
            (f"{ODATA}/", Operation(f"/{ODATA}/")),
            (
                "main/ifsapplications/web/index.html",
                Operation("/main/ifsapplications/web/index.html"),
            ),
        ],
    )
    def test_odata_paths(self, rest: str, expected: Operation) -> None:
        """OData: the entity set, function or action (with navigation and bound actions), its
        key and the projection; a path outside a projection is the path."""
        assert operation_of(True, rest) == expected

    def test_other_erps_log_the_api_path(self) -> None:
        """PSO and ION: the API path after the route, as it came (the query is never part)."""
        assert operation_of(
            False, "IFSSchedulingRESTfulGateway/api/v1/scheduling/data"
        ) == Operation("/IFSSchedulingRESTfulGateway/api/v1/scheduling/data")
        assert operation_of(False, f"{ODATA}/CustomerInfoSet(CustomerId='1')") == Operation(
            f"/{ODATA}/CustomerInfoSet(CustomerId='1')"
        )

    def test_long_paths_are_cut(self) -> None:
        """An operation or key never takes more than MAX_FIELD characters of a log line."""
        operation = operation_of(True, f"{ODATA}/Set(Key='{'x' * 500}')")
        assert (
            operation.key is not None
            and len(operation.key) == MAX_FIELD
            and operation.key.endswith("…")
        )
        assert len(operation_of(False, "a/" * 300).name) == MAX_FIELD


class TestCredentialId:
    def test_opaque_and_stable_and_changes_with_the_credentials(self) -> None:
        """Twelve hex digits derived from the fingerprint: not part of it, the same for the
        same credentials, different after a rotation."""

        def config(password: str) -> Any:
            return parse_config(
                {"connectors": {"p": offline_pso_connector(password=password)}}
            ).connectors["p"]

        first = fingerprint(config("one"))
        assert credential_id(first) == credential_id(fingerprint(config("one")))
        assert credential_id(first) != credential_id(fingerprint(config("two")))
        assert len(credential_id(first)) == 12 and credential_id(first) not in first


class TestAccessLog:
    async def test_odata_operation_and_key(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """An OData call logs its entity set, key and the credential's id; never
        the token nor any part of it."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(10)
        line = await access_line(
            http, server, f"/ifs/{ODATA}/CustomerInfoSet(CustomerId='10%2F7')?$select=Name"
        )
        assert line["operation"] == "CustomerInfoSet"
        assert line["operation_key"] == "CustomerId='10%2F7'"
        connector = server.broker.connectors["ifs"]
        assert line["credential_id"] == credential_id(fingerprint(connector.config))
        token = ifs_sim.api_requests[-1].credential
        assert token and token[:8] not in str(line) and line["credential_id"] not in token

    async def test_pso_operation_is_the_api_path_without_query(
        self, pso_sim: PsoSim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        server = await make_broker({"pso": pso_connector(pso_sim, ca_file)})
        await server.broker.wait_ready(10)
        line = await access_line(
            http,
            server,
            "/pso/IFSSchedulingRESTfulGateway/api/v1/scheduling/data?datasetId=X&secret=1",
        )
        assert line["operation"] == "/IFSSchedulingRESTfulGateway/api/v1/scheduling/data"
        assert "operation_key" not in line
        assert len(line["credential_id"]) == 12

    async def test_ion_operation_is_the_api_path_without_query(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        server = await make_broker({"ion": infor_connector(infor_sim, ca_file)})
        await server.broker.wait_ready(10)
        line = await access_line(http, server, "/ion/ifsservice/usermgt/v2/users/me?fields=a")
        assert line["status"] == 200
        assert line["operation"] == "/ifsservice/usermgt/v2/users/me"
        assert len(line["credential_id"]) == 12

    async def test_no_credential_id_when_none_was_injected(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A request answered before any ERP attempt (no route) names no operation or credential."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        line = await access_line(http, server, "/nowhere/x")
        assert line["status"] == 404
        assert "operation" not in line and "credential_id" not in line
