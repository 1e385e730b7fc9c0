"""The Prometheus alert rules: k8s/monitoring/alerts.rules.yaml, prometheusrule.yaml and their
promtool unit tests, alerts.test.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import (
    MONITORING,
    ROOT,
    load_yaml,
    metric_names,
    output_of,
    require_tool,
    run,
)

RULES = MONITORING / "alerts.rules.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "alerts.test.yaml"

#: The alerts the product promises (issue "Operate it"), with their severity.
EXPECTED_ALERTS = {
    "ErpBrokerConnectorDown": "critical",
    "ErpBrokerTokenRefreshFailing": "warning",
    "ErpBrokerTokenExpiringSoon": "critical",
    "ErpBrokerSustained429": "warning",
    "ErpBrokerHighErrorRatio": "critical",
    "ErpBrokerLoginPaused": "critical",
    "ErpBrokerStoreDown": "warning",
    # issue 17: expiry you can see coming, 14 days ahead
    "ErpBrokerCredentialsExpiringSoon": "warning",
    "ErpBrokerGrantIdleExpiringSoon": "warning",
    "ErpBrokerServiceAccountLocked": "critical",
}
#: Series a rule may select before broker.metrics exports them: the grant-idle expiry gauge is
#: issue 17's other half, on another branch. Empty this once both are merged.


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def alert(name: str) -> dict[str, Any]:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == name]
    return rule


class TestAlertRules:
    def test_promtool_accepts_the_rules_file(self) -> None:
        """`promtool check rules` accepts alerts.rules.yaml (syntax, PromQL, templates)."""
        promtool = require_tool("promtool")
        result = run(promtool, "check", "rules", str(RULES))
        assert result.returncode == 0, output_of(result)

    def test_promtool_unit_tests_pass(self) -> None:
        """`promtool test rules alerts.test.yaml` passes: every alert fires when it should and
        stays silent when it should not."""
        promtool = require_tool("promtool")
        result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=MONITORING)
        assert result.returncode == 0, output_of(result)

    def test_has_every_promised_alert_with_its_severity(self) -> None:
        """The rules file defines exactly the promised alerts, each with its severity label."""
        severities = {rule["alert"]: rule["labels"]["severity"] for rule in alert_rules()}
        assert severities == EXPECTED_ALERTS

    @pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
    def test_alert_is_documented_and_waits_before_firing(self, name: str) -> None:
        """Every alert has a `for:` (no paging on one bad scrape) and summary, description and
        runbook annotations; the runbook points at its section of docs/operations.md."""
        rule = alert(name)
        assert rule.get("for"), f"{name} has no `for:`"
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations)
        assert f"docs/operations.md#{name.lower()}" in annotations["runbook"]

    @pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
    def test_runbook_section_exists(self, name: str) -> None:
        """docs/operations.md has the section each runbook annotation links to (a `### Name`
        heading, whose anchor is the lower-cased name)."""
        doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
        assert f"\n### {name}\n" in doc

    @pytest.mark.parametrize("name", sorted(set(EXPECTED_ALERTS) - {"ErpBrokerStoreDown"}))
    def test_connector_alerts_name_the_connector(self, name: str) -> None:
        """Alerts about a connector say which one, in the summary and the description.
        (ErpBrokerStoreDown is about a broker's store, which has no connector label.)"""
        annotations = alert(name)["annotations"]
        assert "{{ $labels.connector }}" in annotations["summary"]
        assert "{{ $labels.connector }}" in annotations["description"]

    def test_rules_use_only_exported_metrics(self, exported_series: dict[str, str]) -> None:
        """Every erp_broker_* series the rules select is exported by broker.metrics, with the
        right suffix for its type (_total, _bucket, _sum, _count)."""
        for rule in alert_rules():
            names = metric_names(rule["expr"])
            assert names, f"{rule['alert']} selects no erp_broker_* series"
            unknown = names - set(exported_series)
            assert not unknown, (
                f"{rule['alert']} uses series broker.metrics does not export: {unknown}"
            )

    def test_expiring_soon_uses_the_last_refresh_gauge(self) -> None:
        """ErpBrokerTokenExpiringSoon compares expiry with time() and looks at the last
        successful refresh, so a just-refreshed short-lived token does not page."""
        expr = alert("ErpBrokerTokenExpiringSoon")["expr"]
        assert "erp_broker_token_expiry_timestamp_seconds - time()" in expr
        assert "erp_broker_token_last_refresh_timestamp_seconds" in expr

    def test_every_alert_is_unit_tested_firing_and_silent(self) -> None:
        """alerts.test.yaml checks each alert at least once firing and once not firing."""
        firing: set[str] = set()
        silent: set[str] = set()
        for test in load_yaml(RULE_TESTS)["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
        assert firing >= set(EXPECTED_ALERTS), (
            f"never tested firing: {set(EXPECTED_ALERTS) - firing}"
        )
        assert silent >= set(EXPECTED_ALERTS), (
            f"never tested silent: {set(EXPECTED_ALERTS) - silent}"
        )

    def test_unit_tests_load_the_rules_file(self) -> None:
        """alerts.test.yaml tests alerts.rules.yaml itself, not a copy."""
        assert load_yaml(RULE_TESTS)["rule_files"] == [RULES.name]


class TestPrometheusRule:
    def test_is_a_prometheus_rule_resource(self) -> None:
        """prometheusrule.yaml is a monitoring.coreos.com/v1 PrometheusRule with a name and
        `spec.groups` (kubernetes-validate has no schema for CRDs, so the shape is checked here)."""
        resource = load_yaml(PROMETHEUS_RULE)
        assert resource["apiVersion"] == "monitoring.coreos.com/v1"
        assert resource["kind"] == "PrometheusRule"
        assert resource["metadata"]["name"]
        assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(resource["spec"]) == {"groups"}

    def test_groups_are_identical_to_the_rules_file(self) -> None:
        """The PrometheusRule carries exactly the groups of alerts.rules.yaml: the two never
        diverge (edit alerts.rules.yaml, then copy `groups:` into the PrometheusRule's spec)."""
        assert load_yaml(PROMETHEUS_RULE)["spec"]["groups"] == load_yaml(RULES)["groups"]

    def test_promtool_accepts_its_spec(self, tmp_path: Path) -> None:
        """`promtool check rules` accepts the PrometheusRule's spec as a rules file."""
        promtool = require_tool("promtool")
        spec = tmp_path / "prometheusrule-spec.yaml"
        spec.write_text(yaml.safe_dump(load_yaml(PROMETHEUS_RULE)["spec"]), encoding="utf-8")
        result = run(promtool, "check", "rules", str(spec))
        assert result.returncode == 0, output_of(result)
