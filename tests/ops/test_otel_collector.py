"""k8s/monitoring/otel-collector.yaml: an OpenTelemetry Collector that takes the broker's
OTLP/HTTP traces (the Kubernetes schemas are checked with every manifest in test_manifests.py)."""

from __future__ import annotations

from typing import Any

import yaml

from .support import MONITORING, load_yaml_docs

COLLECTOR = MONITORING / "otel-collector.yaml"


def resource(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in load_yaml_docs(COLLECTOR) if d["kind"] == kind]
    return doc


class TestOtelCollector:
    def test_receives_otlp_http_on_4318_into_a_traces_pipeline(self) -> None:
        """The collector's config takes OTLP/HTTP on 4318 (the port the docs' otlp_endpoint
        names) and runs it through a traces pipeline with a memory limit."""
        config = yaml.safe_load(resource("ConfigMap")["data"]["collector.yaml"])
        assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
        pipeline = config["service"]["pipelines"]["traces"]
        assert pipeline["receivers"] == ["otlp"]
        assert pipeline["processors"][0] == "memory_limiter"
        assert set(pipeline["exporters"]) <= set(config["exporters"])

    def test_service_reaches_the_container_and_mounts_the_config(self) -> None:
        """The Service's 4318 goes to the container's otlp-http port; the container reads the
        ConfigMap's collector.yaml."""
        service = resource("Service")
        deployment = resource("Deployment")
        (port,) = service["spec"]["ports"]
        assert port["port"] == 4318
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[port["targetPort"]] == 4318
        assert (
            service["spec"]["selector"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        (mount,) = container["volumeMounts"]
        assert f"--config={mount['mountPath']}/collector.yaml" in container["args"]
        (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
        assert volume["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
