"""IFS Apps 10 API discovery: `erp-broker discover` and `GET /connectors/<name>/openapi`."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
import structlog.testing
import yaml

from broker import commands
from broker.config import parse_config
from broker.discovery import document_version, parse_operations
from broker.sandbox import IfsApps10Sim, PsoSim
from broker.sandbox.ifs_projections import BY_NAME, PROJECTIONS, openapi_document

from .conftest import BrokerFactory, ifs_connector, metric, pso_connector
from .test_send_loop import RETRIED_FIRST_ANSWERS, SESSION_GONE

LISTING = {"value": [{"Name": p.name, "Description": p.description} for p in PROJECTIONS]}


async def cli(*args: str) -> tuple[int, str, str]:
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


def openapi_calls(sim: IfsApps10Sim) -> list[str]:
    return [r.raw_path for r in sim.api_requests if r.raw_path.endswith("/$openapi")]


def expected_operations(name: str, broker_url: str) -> list[dict[str, Any]]:
    """The operations as discovery lists them: each with its URL through the broker."""
    service = f"{broker_url}/ifs/main/ifsapplications/projection/v1/{name}.svc"
    document = openapi_document(BY_NAME[name], "https://x", 3)
    return [{**op.to_json(), "url": service + op.path} for op in parse_operations(document)]


class TestParsing:
    @pytest.mark.parametrize("version", [3, 2])
    def test_operations_from_openapi_3_and_swagger_2(self, version: int) -> None:
        """Method, path, summary and operationId come out of either document version, in order."""
        document = openapi_document(BY_NAME["CustomerHandling"], "https://erp.example.com", version)
        operations = parse_operations(document)
        assert [(op.method, op.path) for op in operations] == [
            ("GET", "/CustomerInfoSet"),
            ("POST", "/CustomerInfoSet"),
            ("GET", "/CustomerInfoSet(CustomerId='{CustomerId}')"),
            ("DELETE", "/CustomerInfoSet(CustomerId='{CustomerId}')"),
            ("PATCH", "/CustomerInfoSet(CustomerId='{CustomerId}')"),
        ]
        assert operations[0].summary == "Get entities from CustomerInfoSet"
        assert operations[0].operation_id == "Get_CustomerInfoSet"
        assert document_version(document) == ("openapi 3.0.1" if version == 3 else "swagger 2.0")

    def test_not_a_document(self) -> None:
        """Anything else is refused with a reason."""
        with pytest.raises(ValueError, match="not an OpenAPI"):
            parse_operations({"value": []})


class TestCommandLine:
    async def test_json_listing_cached_in_the_store(
        self, ifs_sim: IfsApps10Sim, ca_file: str, tmp_path: Path
    ) -> None:
        """discover --format json lists every projection's operations; a second run reads the store's
        cache (no $openapi request)."""
        path = tmp_path / "broker.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "store": {"sqlite": str(tmp_path / "t.db")},
                    "connectors": {"ifs": ifs_connector(ifs_sim, ca_file)},
                }
            )
        )
        code, out, err = await cli("discover", "-c", str(path), "ifs", "--format", "json")
        assert code == 0, err
        first = orjson.loads(out)
        assert [p["name"] for p in first["projections"]] == sorted(p.name for p in PROJECTIONS)
        assert first["operation_count"] == 15 and first["failed"] == 0
        customer = first["projections"][0]
        # what an app developer pastes: the broker's URLs (the default listen address here)
        assert customer["operations"] == expected_operations(
            "CustomerHandling", "http://127.0.0.1:8080"
        )
        assert (
            customer["proxy_path"] == "/ifs/main/ifsapplications/projection/v1/CustomerHandling.svc"
        )
        assert customer["url"] == "http://127.0.0.1:8080" + customer["proxy_path"]
        assert first["broker"] == "http://127.0.0.1:8080"
        assert ifs_sim.url not in orjson.dumps(customer["operations"]).decode()
        assert customer["openapi_version"] == "openapi 3.0.1" and customer["cached"] is False
        assert len(openapi_calls(ifs_sim)) == 3

        code, out, err = await cli("discover", "-c", str(path), "ifs", "--format", "json")
        assert code == 0, err
        second = orjson.loads(out)
        assert all(p["cached"] for p in second["projections"])
        assert [p["operations"] for p in second["projections"]] == [
            p["operations"] for p in first["projections"]
        ]
        assert len(openapi_calls(ifs_sim)) == 3

    async def test_refresh_fetches_again(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--refresh ignores the cache, fetches every document again and stores it anew."""
        config = parse_config(
            {
                "store": {"sqlite": str(tmp_path / "t.db")},
                "connectors": {"ifs": ifs_connector(ifs_sim, ca_file)},
            }
        )

        async def run(refresh: bool) -> list[bool]:
            assert await commands.discover(config, "ifs", None, "json", refresh) == 0
            return [p["cached"] for p in orjson.loads(capsys.readouterr().out)["projections"]]

        assert await run(False) == [False] * 3
        assert await run(True) == [False] * 3
        assert len(openapi_calls(ifs_sim)) == 6
        assert await run(False) == [True] * 3
        assert len(openapi_calls(ifs_sim)) == 6

    async def test_table_for_one_projection(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--projection P prints P's operations as a table: method, URL through the broker,
        summary."""
        config = parse_config(
            {
                "store": {"sqlite": str(tmp_path / "t.db")},
                "connectors": {"ifs": ifs_connector(ifs_sim, ca_file)},
            }
        )
        code = await commands.discover(config, "ifs", "WorkOrderHandling", "table", False)
        out = capsys.readouterr().out
        assert code == 0
        lines = out.splitlines()
        assert lines[0] == "WorkOrderHandling - Separate work orders: prepare, release and report"
        service = (
            "http://127.0.0.1:8080/ifs/main/ifsapplications/projection/v1/WorkOrderHandling.svc"
        )
        assert lines[1] == f"  {service}"
        assert lines[2].split() == ["METHOD", "URL", "SUMMARY"]
        assert lines[3].split(maxsplit=2) == [
            "GET",
            f"{service}/ActiveSeparateSet",
            "Get entities from ActiveSeparateSet",
        ]
        assert lines[-1] == "ifs: 1 projection, 5 operations (0 from cache)"
        assert openapi_calls(ifs_sim) == [
            "/main/ifsapplications/projection/v1/WorkOrderHandling.svc/$openapi"
        ]

    async def test_usage_errors(
        self,
        ifs_sim: IfsApps10Sim,
        pso_sim: PsoSim,
        ca_file: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Exit 2 for an unknown connector or one that is not ifs_apps10; 1 when the login fails."""
        config = parse_config(
            {
                "store": {"sqlite": str(tmp_path / "t.db")},
                "connectors": {
                    "ifs": ifs_connector(ifs_sim, ca_file, password="wrong-password"),
                    "pso": pso_connector(pso_sim, ca_file),
                },
            }
        )
        assert await commands.discover(config, "nope", None, "table", False) == 2
        assert await commands.discover(config, "pso", None, "table", False) == 2
        assert await commands.discover(config, "ifs", None, "table", False) == 1
        err = capsys.readouterr().err
        assert "no connector named 'nope'" in err and "is ifs_pso" in err
        assert "login failed" in err and "check username and password" in err


class TestAdminApi:
    async def test_listing_cached_in_the_store(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """GET /connectors/ifs/openapi uses the broker's credential; documents are cached in its store."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["projection_count"] == 3 and body["operation_count"] == 15
        assert ifs_sim.count_token_requests() == 1  # the broker's own login, nothing more
        assert len(openapi_calls(ifs_sim)) == 3
        assert server.broker.store is not None
        assert await server.broker.store.get_blob("openapi:ifs:CustomerHandling") is not None

        async with http.get(
            f"{server.admin_url}/connectors/ifs/openapi?projection=CustomerHandling"
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        [only] = body["projections"]
        assert only["cached"] is True
        assert only["operations"] == expected_operations("CustomerHandling", server.proxy_url)
        assert len(openapi_calls(ifs_sim)) == 3

        async with http.get(f"{server.admin_url}/connectors/ifs/openapi?refresh=1") as resp:
            assert resp.status == 200
        assert len(openapi_calls(ifs_sim)) == 6

    async def test_expired_token_is_refreshed_and_replayed(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A 401 during discovery goes through the token manager: one refresh, then the call again."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        ifs_sim.expire_all_tokens()
        async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
            assert resp.status == 200
            assert (await resp.json())["failed"] == 0
        assert ifs_sim.count_token_requests("refresh_token") == 1

    async def test_one_failing_projection_does_not_fail_the_listing(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A listed projection whose $openapi fails carries its error; the others are listed."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        ifs_sim.queue_api_response(200, body={"value": [*LISTING["value"], {"Name": "Missing"}]})
        async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
            assert resp.status == 200
            body = await resp.json()
        by_name = {p["name"]: p for p in body["projections"]}
        assert body["failed"] == 1 and len(by_name) == 4
        assert (
            "404" in by_name["Missing"]["error"] and "ODP_NOT_FOUND" in by_name["Missing"]["error"]
        )
        assert all(
            p["error"] is None and p["operations"] for n, p in by_name.items() if n != "Missing"
        )
        async with http.get(
            f"{server.admin_url}/connectors/ifs/openapi?projection=Missing"
        ) as resp:
            assert resp.status == 502

    async def test_concurrency_is_bounded(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Eight projections, slow documents: at most four $openapi requests at a time."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await server.broker.wait_ready(5)
        names = [f"P{i}" for i in range(8)]
        ifs_sim.queue_api_response(200, body={"value": [{"Name": n} for n in names]})
        document = {"openapi": "3.0.1", "paths": {"/Set": {"get": {"summary": "s"}}}}
        ifs_sim.queue_api_response(200, body=document, count=8, delay=0.15)
        async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
            assert resp.status == 200
            assert (await resp.json())["operation_count"] == 8
        arrivals = sorted(r.time for r in ifs_sim.api_requests[1:])
        assert len(arrivals) == 8
        assert arrivals[3] - arrivals[0] < 0.15 <= arrivals[4] - arrivals[0]

    async def test_not_for_other_connector_types(
        self,
        ifs_sim: IfsApps10Sim,
        pso_sim: PsoSim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A PSO connector or an unknown name: 404 with a broker error body."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file), "pso": pso_connector(pso_sim, ca_file)}
        )
        for name in ("pso", "nope"):
            async with http.get(f"{server.admin_url}/connectors/{name}/openapi") as resp:
                assert resp.status == 404 and resp.headers["X-Broker-Error"] == "no_route"
                assert (await resp.json())["error"]["message"]
        assert pso_sim.api_requests == []


class TestThroughTheSendLoop:
    """Discovery sends through the connector's one send loop: each retry it makes is the
    proxy's, counted in ``erp_broker_retries_total{reason}`` and in its request line's
    ``attempts``."""

    @pytest.mark.parametrize(
        ("status", "headers", "body", "reason"),
        RETRIED_FIRST_ANSWERS,
    )
    async def test_each_retry_is_counted(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        status: int,
        headers: dict[str, str],
        body: bytes,
        reason: str,
    ) -> None:
        """The projection list's first answer is retried; the listing then succeeds, the retry
        is counted once under its reason and a line says the list took two attempts."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, auth_failure=[SESSION_GONE])}
        )
        await server.broker.wait_ready(5)
        ifs_sim.queue_api_response(status, headers=headers, body=body)
        with structlog.testing.capture_logs() as logs:
            async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
                assert resp.status == 200
                assert (await resp.json())["failed"] == 0
        assert metric(server, "erp_broker_retries_total", connector="ifs", reason=reason) == 1
        others = [
            r for r in ("auth", "rate_limited", "gateway_timeout", "transient") if r != reason
        ]
        for other in others:
            assert metric(server, "erp_broker_retries_total", connector="ifs", reason=other) == 0
        lines = [line for line in logs if line["event"] == "discovery_retried"]
        assert [(line["status"], line["attempts"]) for line in lines] == [(200, 2)]
        assert lines[0]["path"].endswith("/AllProjections.svc/Projections")  # the list's
        assert len(ifs_sim.api_requests) == 1 + 1 + 3  # the list twice, three documents
        if reason == "auth":
            assert ifs_sim.count_token_requests() == 2  # the broker's login, one more after

    async def test_a_window_too_long_for_the_budget_fails_the_document_not_the_wait(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """A 429 whose Retry-After is longer than retry.max_total: the send loop gives the 429
        back at once (no retry counted), and discovery reports it as that projection's error."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, retry={"max_total": 2})})
        await server.broker.wait_ready(5)
        ifs_sim.queue_api_response(200, body=LISTING)
        ifs_sim.queue_api_response(429, headers={"Retry-After": "30"})
        async with asyncio.timeout(10):
            async with http.get(
                f"{server.admin_url}/connectors/ifs/openapi?projection=CustomerHandling"
            ) as resp:
                assert resp.status == 502
                [only] = (await resp.json())["projections"]
        assert "429" in only["error"]
        assert (
            metric(server, "erp_broker_retries_total", connector="ifs", reason="rate_limited") == 0
        )

    async def test_an_erp_that_does_not_answer_is_a_discovery_failure(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """The send loop's transport failure (the ERP silent past ``timeout``) fails the listing
        as 502 discovery_failed, naming what failed and why."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, timeout=0.5)})
        await server.broker.wait_ready(5)
        ifs_sim.queue_api_response(200, body=LISTING, delay=3)
        async with asyncio.timeout(10):
            async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
                assert resp.status == 502
                assert resp.headers["X-Broker-Error"] == "discovery_failed"
                message = (await resp.json())["error"]["message"]
        assert "the projection list" in message and "nothing came for 0.5s" in message

    async def test_a_window_open_when_it_comes_is_charged_to_its_budget(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Discovery waits its turn like a proxied request: a 30 s rate-limit window with
        retry.max_total 2 is not slept out; the listing fails at once naming the budget, and
        the ERP sees nothing."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, retry={"max_total": 2})})
        await server.broker.wait_ready(5)
        await server.broker.coordinator.set_window("ifs", time.time() + 30)
        async with asyncio.timeout(10):
            async with http.get(f"{server.admin_url}/connectors/ifs/openapi") as resp:
                assert resp.status == 502
                message = (await resp.json())["error"]["message"]
        assert "the projection list" in message and "retry.max_total" in message
        assert ifs_sim.api_requests == []
