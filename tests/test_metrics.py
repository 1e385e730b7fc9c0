"""Live /metrics from a broker that has done real work: the brief's names and labels,
promtool's approval, and every metric the dashboard and alert rules use."""

from __future__ import annotations

import asyncio
import re
import subprocess

import aiohttp
import pytest

from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector
from .ops.support import metric_names, require_tool
from .ops.test_alert_rules import alert_rules
from .ops.test_dashboard import expressions

CONTRACT = {
    "erp_broker_requests_total": {"connector", "method", "status"},
    "erp_broker_request_duration_seconds_bucket": {"connector", "le"},
    "erp_broker_upstream_request_duration_seconds_bucket": {"connector", "le"},
    "erp_broker_retries_total": {"connector", "reason"},
    "erp_broker_token_requests_total": {"connector", "grant", "outcome"},
    "erp_broker_token_request_duration_seconds_bucket": {"connector", "le"},
    "erp_broker_token_expiry_timestamp_seconds": {"connector"},
    "erp_broker_token_refresh_waiters_total": {"connector"},
    "erp_broker_connector_up": {"connector"},
}
_SAMPLE = re.compile(r"^(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})? ")


def samples(text: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            out.setdefault(match["name"], []).append(labels)
    return out


@pytest.fixture
async def scraped(
    ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
) -> str:
    """A broker after a 401 replay, a 429 retry, a 504 retry, a no_route and a waiter."""
    ifs_sim.token_delay = 0.2
    # credentials_expire set: its gauge has a series only when the date is configured.
    server: BrokerServer = await make_broker(
        {
            "ifs": ifs_connector(
                ifs_sim, ca_file, retry={"base_delay": 0.01}, credentials_expire="2030-01-31"
            )
        }
    )
    async with http.get(f"{server.proxy_url}/ifs/_test/echo/a") as resp:
        assert resp.status == 200
    ifs_sim.token_delay = 0
    ifs_sim.queue_api_response(401)
    ifs_sim.queue_api_response(429, headers={"Retry-After": "0"})
    ifs_sim.queue_api_response(504)
    for _ in range(3):
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/b") as resp:
            await resp.read()
    async with http.get(f"{server.proxy_url}/nowhere") as resp:
        assert resp.status == 404
    async with http.get(f"{server.admin_url}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


class TestLiveMetrics:
    async def test_contract_names_and_labels(self, scraped: str) -> None:
        """Every metric of the brief is exported with exactly its labels, driven by real events."""
        found = samples(scraped)
        for name, labels in CONTRACT.items():
            assert name in found, name
            assert {frozenset(s) for s in found[name]} == {frozenset(labels)}, name
        statuses = {
            s["status"] for s in found["erp_broker_requests_total"] if s["connector"] == "ifs"
        }
        assert statuses == {"200"}
        reasons = {s["reason"] for s in found["erp_broker_retries_total"]}
        assert reasons == {
            "auth",
            "rate_limited",
            "gateway_timeout",
            "stale_connection",
            "transient",
        }
        assert re.search(
            r'erp_broker_retries_total\{connector="ifs",reason="gateway_timeout"\} 1\.0', scraped
        )
        assert re.search(r'erp_broker_connector_up\{connector="ifs"\} 1\.0', scraped)

    async def test_labels_stay_bounded(self, scraped: str) -> None:
        """No path, id or user input ever becomes a label value."""
        assert "nowhere" not in scraped and "_test" not in scraped and "echo" not in scraped

    async def test_promtool_check_metrics(self, scraped: str) -> None:
        """The exposition passes `promtool check metrics` (lint included)."""
        promtool = require_tool("promtool")
        result = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=scraped,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    async def test_every_metric_in_dashboard_and_rules_is_exported(self, scraped: str) -> None:
        """Names used by the Grafana dashboard and the alert rules appear in live output."""
        live = set(samples(scraped))
        used = {n for _, expr in expressions() for n in metric_names(expr)}
        used |= {n for rule in alert_rules() for n in metric_names(rule["expr"])}
        assert used, "no metric names found in the artifacts"
        assert sorted(used - live) == []
