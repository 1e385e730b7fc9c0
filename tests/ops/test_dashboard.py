"""The Grafana dashboard, k8s/monitoring/grafana-dashboard.json."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .support import MONITORING, exported_families, metric_names, output_of, require_tool, run

DASHBOARD = MONITORING / "grafana-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"
CONNECTOR_QUERY = "label_values(erp_broker_connector_up, connector)"


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels():
        for target in panel.get("targets", []):
            yield panel, target


def expressions() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query the dashboard runs: panel targets and variables."""
    for panel, target in targets():
        yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']}",
                query if isinstance(query, str) else query["query"],
            )


def as_plain_promql(expr: str) -> str:
    """Replace Grafana's variables so that promtool can parse the expression."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def variable(name: str) -> dict[str, Any]:
    found: dict[str, Any]
    (found,) = [v for v in dashboard()["templating"]["list"] if v["name"] == name]
    return found


class TestGrafanaDashboard:
    def test_is_an_importable_dashboard(self) -> None:
        """The file is a dashboard Grafana imports: a title, a stable uid, no database id, and
        the Prometheus data source declared as the import input DS_PROMETHEUS."""
        board = dashboard()
        assert board["title"] and board["uid"] == "erp-broker"
        assert board["id"] is None
        inputs = {i["name"]: i for i in board["__inputs"]}
        assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
        assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"

    def test_datasource_is_also_a_variable(self) -> None:
        """DS_PROMETHEUS is a data source variable too, so the dashboard also works when
        provisioned from a file or ConfigMap, where import inputs are not substituted."""
        ds = variable("DS_PROMETHEUS")
        assert ds["type"] == "datasource" and ds["query"] == "prometheus"

    def test_every_query_uses_the_datasource_input(self) -> None:
        """Every panel and every target queries ${DS_PROMETHEUS}, never a hard-coded uid."""
        for panel in panels():
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel[
                "title"
            ]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert variable("connector")["datasource"]["uid"] == DATASOURCE_UID

    def test_connector_variable(self) -> None:
        """The `connector` variable lists label_values(erp_broker_connector_up, connector), multi
        select with All, and every panel about connectors filters on it."""
        connector = variable("connector")
        query = connector["query"]
        assert (query if isinstance(query, str) else query["query"]) == CONNECTOR_QUERY
        assert connector["multi"] and connector["includeAll"]
        for where, expr in expressions():
            # The store and the trace export are per broker, not per connector.
            if where.startswith("panel") and not any(
                name in expr for name in ("erp_broker_store_", "erp_broker_trace_")
            ):
                assert 'connector=~"$connector"' in expr, where

    def test_queries_use_only_exported_metrics(self, exported_series: dict[str, str]) -> None:
        """Every erp_broker_* series a query selects is exported by broker.metrics, with the
        right suffix for its type (_total, _bucket, _sum, _count)."""
        for where, expr in expressions():
            names = metric_names(expr)
            assert names, f"{where} selects no erp_broker_* series"
            unknown = names - set(exported_series)
            assert not unknown, f"{where} uses series broker.metrics does not export: {unknown}"

    def test_shows_every_exported_metric(self, exported_series: dict[str, str]) -> None:
        """Every metric family broker.metrics exports appears on some panel."""
        shown = {exported_series[name] for _, expr in expressions() for name in metric_names(expr)}
        assert exported_families() - shown == set()

    def test_latency_quantiles_come_from_histogram_buckets(self) -> None:
        """Latency panels compute histogram_quantile over rates of _bucket series, keeping `le`."""
        quantile_exprs = [expr for _, expr in expressions() if "histogram_quantile" in expr]
        families = {name for expr in quantile_exprs for name in metric_names(expr)}
        assert families == {
            "erp_broker_request_duration_seconds_bucket",
            "erp_broker_upstream_request_duration_seconds_bucket",
            "erp_broker_token_request_duration_seconds_bucket",
        }
        for expr in quantile_exprs:
            assert re.search(r"sum by \([^)]*\ble\b[^)]*\) \(rate\(", expr), expr

    def test_token_expiry_countdown(self) -> None:
        """A panel counts down to token expiry: the expiry timestamp minus time()."""
        assert any(
            "erp_broker_token_expiry_timestamp_seconds" in expr and "- time()" in expr
            for _, expr in expressions()
        )

    def test_promtool_parses_every_panel_query(self, tmp_path: Path) -> None:
        """Every panel query is valid PromQL: promtool checks them as recording rules, with
        Grafana's variables replaced by plain values. (label_values() of the connector variable
        is Grafana's, not PromQL.)"""
        promtool = require_tool("promtool")
        rules = [
            {"record": f"dashboard:query{i}", "expr": as_plain_promql(target["expr"])}
            for i, (_, target) in enumerate(targets())
        ]
        path = tmp_path / "dashboard-queries.yaml"
        path.write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8"
        )
        result = run(promtool, "check", "rules", str(path))
        assert result.returncode == 0, output_of(result)

    def test_panels_have_unique_ids_and_do_not_overlap(self) -> None:
        """Panel ids are unique and no two panels share a grid cell of the 24-column layout."""
        ids = [panel["id"] for panel in panels()]
        assert len(ids) == len(set(ids))
        taken: dict[tuple[int, int], str] = {}
        for panel in panels():
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                    taken[(x, y)] = panel["title"]
