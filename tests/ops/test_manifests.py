"""The Kubernetes manifests under k8s/: schemas, the broker container, config, secrets,
PodMonitor, kustomizations, and the Redis variant."""

from __future__ import annotations

import base64
import importlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .support import (
    K8S,
    K8S_OLDEST_FOR_CLASSIC,
    K8S_VERSION,
    load_yaml,
    load_yaml_docs,
    manifest_paths,
    manifests,
    missing,
)

#: Kinds from CRDs: kubernetes-validate has no schema for them; their shape is tested instead.
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}
#: Build files, not resources: never sent to a cluster.
NOT_RESOURCES = {"Kustomization"}
OTEL_COLLECTOR = "k8s/monitoring/otel-collector.yaml"

DEPLOYMENTS = {
    "native": K8S / "deployment-native-sidecar.yaml",
    "classic": K8S / "deployment-classic.yaml",
    "redis": K8S / "redis" / "deployment.yaml",
}
CONFIGMAPS = {
    "native": K8S / "configmap.yaml",
    "classic": K8S / "configmap.yaml",
    "redis": K8S / "redis" / "configmap.yaml",
}
SECRET_EXAMPLES = [K8S / "secret.example.yaml", K8S / "redis" / "secret.example.yaml"]

BROKER = "erp-broker"
ADMIN_PORT = 9090
STORE_DIR = "/var/lib/erp-broker"
FILE_REFERENCE = re.compile(r"\$\{file:([^}]+)\}")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def kubernetes_validate() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        missing("kubernetes_validate")


def relative(path: Path) -> str:
    return str(path.relative_to(K8S.parent))


def pod_spec(variant: str) -> dict[str, Any]:
    spec: dict[str, Any] = load_yaml(DEPLOYMENTS[variant])["spec"]["template"]["spec"]
    return spec


def broker_container(variant: str) -> dict[str, Any]:
    spec = pod_spec(variant)
    found: dict[str, Any]
    (found,) = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == BROKER
    ]
    return found


def broker_config(variant: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(load_yaml(CONFIGMAPS[variant])["data"]["broker.yaml"])
    return config


def config_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in config_strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in config_strings(value)]
    return [node] if isinstance(node, str) else []


def mounted_files(variant: str) -> set[str]:
    """Absolute paths of the files the broker container sees from Secret volumes."""
    spec = pod_spec(variant)
    volumes = {v["name"]: v for v in spec["volumes"]}
    files: set[str] = set()
    for mount in broker_container(variant)["volumeMounts"]:
        volume = volumes[mount["name"]]
        sources = [
            s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s
        ]
        if "secret" in volume:
            sources.append(volume["secret"])
        for source in sources:
            for item in source["items"]:
                files.add(f"{mount['mountPath']}/{item['path']}")
    return files


def placeholder_secret(name: str) -> str:
    """Content of the right shape for a mounted secret file."""
    if name.endswith(".ionapi"):
        keys = ("ti", "cn", "ci", "cs", "saak", "sask")
        ionapi = {key: f"placeholder-{key}" for key in keys}
        ionapi |= {
            "iu": "https://ionapi.example.com",
            "pu": "https://sso.example.com/TENANT/as/",
            "oa": "authorization.oauth2",
            "ot": "token.oauth2",
            "or": "revoke_token.oauth2",
        }
        return json.dumps(ionapi)
    if name == "store-key":
        return base64.b64encode(bytes(range(32))).decode() + "\n"
    return "placeholder\n"


class TestKubernetesSchemas:
    @pytest.mark.parametrize("path", manifest_paths(), ids=relative)
    def test_manifest_validates_strictly(self, path: Path) -> None:
        """Every resource of a core kind validates against Kubernetes' schema of K8S_VERSION in
        strict mode (unknown fields are errors); the classic variant also against
        K8S_OLDEST_FOR_CLASSIC, since it is the one for old clusters."""
        validator = kubernetes_validate()
        versions = [K8S_VERSION]
        if path == DEPLOYMENTS["classic"] or path.name in ("configmap.yaml", "secret.example.yaml"):
            versions.append(K8S_OLDEST_FOR_CLASSIC)
        for doc in load_yaml_docs(path):
            if doc["kind"] in CUSTOM_KINDS | NOT_RESOURCES:
                continue
            for version in versions:
                try:
                    validator.validate(doc, version, strict=True)
                except validator.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    pytest.fail(
                        f"{relative(path)} {doc['kind']} against {version}: {where}: {e.message}"
                    )

    def test_discovers_every_manifest(self) -> None:
        """Manifest discovery sees every resource file, so the parametrized checks cover them."""
        found = {relative(p) for p in manifest_paths()}
        assert {relative(p) for p in DEPLOYMENTS.values()} <= found
        assert {"k8s/podmonitor.yaml", "k8s/monitoring/prometheusrule.yaml"} <= found
        # The optional OpenTelemetry Collector (issue 17) is the one Deployment that is not
        # the broker's.
        assert {
            relative(p) for p, _ in manifests("Deployment") if relative(p) != OTEL_COLLECTOR
        } == {relative(p) for p in DEPLOYMENTS.values()}

    def test_every_kind_is_validated_or_tested(self) -> None:
        """kubernetes-validate has a schema for every kind under k8s/ except the CRDs and
        Kustomizations, which the structure tests below cover."""
        validator = kubernetes_validate()
        kinds_without_schema = set()
        for path in manifest_paths():
            for doc in load_yaml_docs(path):
                try:
                    validator.validate(doc, K8S_VERSION, strict=True)
                except validator.SchemaNotFoundError:
                    kinds_without_schema.add(doc["kind"])
        assert kinds_without_schema == CUSTOM_KINDS | NOT_RESOURCES

    def test_native_sidecar_needs_a_recent_cluster(self) -> None:
        """The native-sidecar manifest is rejected by an old schema (restartPolicy on an init
        container), which is why deployment-classic.yaml exists: the strict check has teeth."""
        validator = kubernetes_validate()
        with pytest.raises(validator.ValidationError):
            validator.validate(
                load_yaml(DEPLOYMENTS["native"]), K8S_OLDEST_FOR_CLASSIC, strict=True
            )


@pytest.mark.parametrize("variant", sorted(DEPLOYMENTS))
class TestBrokerContainer:
    def test_native_sidecar_or_classic_container(self, variant: str) -> None:
        """The native variants run the broker as an init container with restartPolicy: Always;
        the classic one as a second regular container, beside the app."""
        spec = pod_spec(variant)
        init_names = [c["name"] for c in spec.get("initContainers", [])]
        names = [c["name"] for c in spec["containers"]]
        if variant == "classic":
            assert BROKER in names and len(names) == 2 and not init_names
            assert "restartPolicy" not in broker_container(variant)
        else:
            assert init_names == [BROKER] and BROKER not in names
            assert broker_container(variant)["restartPolicy"] == "Always"

    def test_security_context(self, variant: str) -> None:
        """Non-root numeric user, read-only root filesystem, no privilege escalation, no
        capabilities, the runtime's default seccomp profile."""
        context = broker_container(variant)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == 10001
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        pod = pod_spec(variant)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["fsGroup"] == 10001
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}

    def test_probes_on_the_admin_port(self, variant: str) -> None:
        """Startup and liveness probe /healthz, readiness /readyz, all on port 9090; startup
        allows at least 30 s, liveness never restarts on one slow answer."""
        container = broker_container(variant)
        paths = {
            name: container[name]["httpGet"]
            for name in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        assert paths["startupProbe"]["path"] == "/healthz"
        assert paths["livenessProbe"]["path"] == "/healthz"
        assert paths["readinessProbe"]["path"] == "/readyz"
        assert {p["port"] for p in paths.values()} == {ADMIN_PORT}
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
        assert container["livenessProbe"]["failureThreshold"] >= 3

    def test_ports(self, variant: str) -> None:
        """Only the admin port is declared, named `admin` (the PodMonitor's port); the proxy
        listens on loopback and is not declared."""
        assert broker_container(variant)["ports"] == [
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}
        ]

    def test_resources(self, variant: str) -> None:
        """CPU and memory requests and limits are set."""
        resources = broker_container(variant)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert {"cpu", "memory"} <= set(resources["limits"])

    def test_writable_paths_are_volumes(self, variant: str) -> None:
        """With a read-only root filesystem, /tmp and (for SQLite) the store directory are
        emptyDirs; config and secrets are mounted read-only."""
        volumes = {v["name"]: v for v in pod_spec(variant)["volumes"]}
        mounts = {m["mountPath"]: m for m in broker_container(variant)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        if variant != "redis":
            assert "emptyDir" in volumes[mounts[STORE_DIR]["name"]]
        for path in ("/etc/erp-broker", "/secrets"):
            assert mounts[path]["readOnly"] is True

    def test_config_comes_from_the_configmap(self, variant: str) -> None:
        """ERP_BROKER_CONFIG names broker.yaml in the directory where its ConfigMap is mounted."""
        container = broker_container(variant)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ERP_BROKER_CONFIG"] == "/etc/erp-broker/broker.yaml"
        volumes = {v["name"]: v for v in pod_spec(variant)["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/erp-broker"]
        configmap = load_yaml(CONFIGMAPS[variant])
        assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert "broker.yaml" in configmap["data"]

    def test_secret_files_are_group_readable_only(self, variant: str) -> None:
        """Secret files are mounted 0440: readable by the broker through fsGroup, not by others."""
        (volume,) = [v for v in pod_spec(variant)["volumes"] if v["name"] == "secrets"]
        assert volume["projected"]["defaultMode"] == 0o440


@pytest.mark.parametrize("variant", sorted(DEPLOYMENTS))
class TestBrokerConfig:
    def test_listeners(self, variant: str) -> None:
        """The proxy listens on loopback only; the admin listener on all interfaces, on the
        port the probes and the PodMonitor use."""
        config = broker_config(variant)
        assert config["listen"] == "127.0.0.1:8080"
        assert config["admin_listen"] == f"0.0.0.0:{ADMIN_PORT}"

    def test_store(self, variant: str) -> None:
        """SQLite on the emptyDir for the single-pod variants; for Redis a TLS URL, with the
        password in redis_password from a mounted file, never in the ConfigMap."""
        store = broker_config(variant)["store"]
        if variant == "redis":
            assert store["redis"].startswith("rediss://")
            assert urlsplit(store["redis"]).password is None
            assert FILE_REFERENCE.fullmatch(store["redis_password"])
            assert "sqlite" not in store
        else:
            assert store["sqlite"] == f"{STORE_DIR}/tokens.db"
            assert set(store) <= {"sqlite", "encryption_key"}

    def test_broker_accepts_it(
        self, variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """broker.config.load_config accepts broker.yaml as the pod would see it: the mounted
        Secret files present (placeholders, under tmp_path) and the container's env set."""
        from broker.config import ConfigError, load_config

        secrets = tmp_path / "secrets"
        for path in mounted_files(variant):
            file = secrets / Path(path).relative_to("/secrets")
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(placeholder_secret(file.name), encoding="utf-8")
        for var in broker_container(variant)["env"]:
            monkeypatch.setenv(var["name"], var["value"])
        text = load_yaml(CONFIGMAPS[variant])["data"]["broker.yaml"]
        config_file = tmp_path / "broker.yaml"
        config_file.write_text(text.replace("/secrets/", f"{secrets}/"), encoding="utf-8")
        try:
            load_config(config_file)
        except ConfigError as e:
            pytest.fail(f"{relative(CONFIGMAPS[variant])}: {e}")

    def test_file_references_are_mounted(self, variant: str) -> None:
        """Every ${file:...} reference and ionapi_file in broker.yaml is a file the Deployment
        mounts from a Secret: the broker would refuse to start otherwise."""
        config = broker_config(variant)
        wanted = {p for s in config_strings(config) for p in FILE_REFERENCE.findall(s)}
        wanted |= {c["ionapi_file"] for c in config["connectors"].values() if "ionapi_file" in c}
        assert wanted and all(path.startswith("/secrets/") for path in wanted)
        assert wanted <= mounted_files(variant), wanted - mounted_files(variant)

    def test_env_references_are_set(self, variant: str) -> None:
        """Every ${NAME} reference in broker.yaml is an environment variable of the container."""
        wanted = {
            n for s in config_strings(broker_config(variant)) for n in ENV_REFERENCE.findall(s)
        }
        env = {e["name"] for e in broker_container(variant)["env"]}
        assert wanted <= env, wanted - env

    def test_no_secret_values_in_the_configmap(self, variant: str) -> None:
        """Passwords, client secrets and keys are references, never literal values."""
        for name, connector in broker_config(variant)["connectors"].items():
            for key in ("password", "client_secret", "cs", "sask"):
                if key in connector:
                    assert FILE_REFERENCE.fullmatch(connector[key]), f"connectors.{name}.{key}"

    def test_mounted_secrets_exist_in_the_examples(self, variant: str) -> None:
        """Every Secret key the Deployment mounts is in a secret.example.yaml, so the examples
        show everything that must be created."""
        examples = {
            doc["metadata"]["name"]: set(doc["stringData"])
            for path in SECRET_EXAMPLES
            for doc in load_yaml_docs(path)
        }
        (volume,) = [v for v in pod_spec(variant)["volumes"] if v["name"] == "secrets"]
        for source in volume["projected"]["sources"]:
            secret = source["secret"]
            keys = {item["key"] for item in secret["items"]}
            assert keys <= examples.get(secret["name"], set()), secret["name"]


class TestSecretExamples:
    def test_placeholders_only(self) -> None:
        """The example Secrets hold placeholders, each marked REPLACE-ME."""
        for path in SECRET_EXAMPLES:
            for doc in load_yaml_docs(path):
                assert doc["kind"] == "Secret" and "data" not in doc
                for key, value in doc["stringData"].items():
                    assert "REPLACE-ME" in value, (
                        f"{relative(path)} {doc['metadata']['name']}.{key}"
                    )


class TestPodMonitor:
    def resource(self) -> dict[str, Any]:
        resource: dict[str, Any] = load_yaml(K8S / "podmonitor.yaml")
        return resource

    def test_is_a_pod_monitor(self) -> None:
        """podmonitor.yaml is a monitoring.coreos.com/v1 PodMonitor scraping /metrics on the
        port named admin (kubernetes-validate has no schema for CRDs, so the shape is checked
        here)."""
        resource = self.resource()
        assert resource["apiVersion"] == "monitoring.coreos.com/v1"
        assert resource["kind"] == "PodMonitor"
        assert resource["metadata"]["name"]
        (endpoint,) = resource["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
        assert set(resource["spec"]) <= {
            "selector",
            "podMetricsEndpoints",
            "namespaceSelector",
            "jobLabel",
            "podTargetLabels",
            "sampleLimit",
        }

    @pytest.mark.parametrize("variant", sorted(DEPLOYMENTS))
    def test_selects_every_deployment(self, variant: str) -> None:
        """The PodMonitor's selector matches each Deployment's pods, and the port it scrapes
        is declared on the broker container."""
        wanted = self.resource()["spec"]["selector"]["matchLabels"]
        labels = load_yaml(DEPLOYMENTS[variant])["spec"]["template"]["metadata"]["labels"]
        assert wanted.items() <= labels.items()
        assert "admin" in {p["name"] for p in broker_container(variant)["ports"]}


class TestKustomizations:
    @pytest.mark.parametrize(
        "path", [K8S / "kustomization.yaml", K8S / "redis" / "kustomization.yaml"], ids=relative
    )
    def test_every_listed_file_exists(self, path: Path) -> None:
        """Every resource and generator file a kustomization lists exists and parses; no
        Secret with placeholders is ever applied by it."""
        kustomization = load_yaml(path)
        assert kustomization["kind"] == "Kustomization"
        for resource in kustomization["resources"]:
            docs = load_yaml_docs(path.parent / resource)
            assert docs and all(doc["kind"] != "Secret" for doc in docs), resource
        for generator in kustomization.get("configMapGenerator", []):
            for entry in generator["files"]:
                assert (path.parent / entry.partition("=")[2]).is_file(), entry

    def test_base_applies_monitoring(self) -> None:
        """The base kustomization applies the PodMonitor, the PrometheusRule and the dashboard."""
        kustomization = load_yaml(K8S / "kustomization.yaml")
        assert {"podmonitor.yaml", "monitoring/prometheusrule.yaml"} <= set(
            kustomization["resources"]
        )
        (dashboard,) = kustomization["configMapGenerator"]
        assert dashboard["files"] == ["erp-broker.json=monitoring/grafana-dashboard.json"]
        assert dashboard["options"]["labels"] == {"grafana_dashboard": "1"}


class TestRedisVariant:
    def test_runs_three_replicas_without_a_store_volume(self) -> None:
        """The Redis variant runs three replicas that share tokens through Redis: no SQLite
        emptyDir, and the Redis password mounted from the erp-broker-redis Secret."""
        deployment = load_yaml(DEPLOYMENTS["redis"])
        assert deployment["spec"]["replicas"] == 3
        mounts = {m["mountPath"] for m in broker_container("redis")["volumeMounts"]}
        assert STORE_DIR not in mounts
        assert "/secrets/redis/password" in mounted_files("redis")

    def test_has_a_note(self) -> None:
        """k8s/redis/README.md explains when and how to use the variant."""
        note = (K8S / "redis" / "README.md").read_text(encoding="utf-8")
        assert "replicas" in note and "rediss://" in note
