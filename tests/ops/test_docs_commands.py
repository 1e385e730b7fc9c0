"""Every command the README, docs/ and the Dockerfile show works as written.

The commands are extracted from the documents themselves (fenced `sh` blocks, inline code that
runs `erp-broker`, the Dockerfile's header); those that run on this machine are run, the others
(a cluster, a registry, docker) are checked against what they name: the image the manifests
pull, the Secrets and keys the Deployment mounts, the flags `erp-broker` accepts.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.cli import build_parser
from broker.config import load_config

from .support import DOCKERFILE, K8S, ROOT, load_yaml, load_yaml_docs
from .test_manifests import config_strings

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), K8S / "redis" / "README.md"]
#: What a documented command may start with; anything new must be classified here.
KNOWN = {
    "python3",
    "erp-broker",
    "curl",
    "docker",
    "kubectl",
    "bench/run.sh",
    "cd",
    "openssl",
    ".",  # activating the virtualenv (run below)
    "grep",
    "head",  # filters of another command's output
    "promtool",  # the alert rules' checks, run by test_alert_rules.py
}


def _logical_lines(text: str) -> list[str]:
    """Lines with `\\` continuations joined and comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _split(line: str) -> list[list[str]]:
    """A shell line as the words of each command: comments dropped, `&&`/`|`/`;` chains split."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "|", "||", ";", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, words) for every command in the documents."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, re.S):
            for line in _logical_lines(block):
                found.append((doc.name, line))
        for span in re.findall(r"`([^`\n]+)`", text):
            if span.startswith("erp-broker ") or "-- erp-broker " in span:
                found.append((doc.name, span))
    header = [
        line.removeprefix("#").strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("#   ")
    ]
    found += [("Dockerfile", line) for line in _logical_lines("\n".join(header))]
    return [(where, words) for where, line in found for words in _split(line)]


COMMANDS = documented_commands()


def broker_image() -> str:
    """The erp-broker image kustomize renders: the `images:` entry applied to the manifests."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    entries = {entry["name"]: entry for entry in kustomization.get("images", [])}
    images = set()
    for resource in kustomization["resources"]:
        for doc in load_yaml_docs(K8S / resource):
            for container in _containers(doc):
                if container["name"] != "erp-broker":
                    continue
                name, _, tag = container["image"].rpartition(":")
                entry = entries.get(name)
                assert entry is not None, f"{resource}: {name} has no kustomize images: entry"
                images.add(f"{entry.get('newName', name)}:{entry.get('newTag', tag)}")
    assert len(images) == 1, images
    return images.pop()


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _docker_run_parts(words: list[str]) -> tuple[dict[str, list[str]], str, list[str]]:
    """`docker run` options (by flag), the image, and the arguments after it."""
    options: dict[str, list[str]] = {}
    i = 2
    takes_value = {"-v", "-p", "-e", "--tmpfs", "--cap-drop", "--security-opt", "--entrypoint"}
    while i < len(words):
        word = words[i]
        if word in takes_value:
            options.setdefault(word, []).append(words[i + 1])
            i += 2
        elif word.startswith("-"):
            options.setdefault(word, [])
            i += 1
        else:
            return options, word, words[i + 1 :]
    raise AssertionError(f"no image in {' '.join(words)}")


class TestExtraction:
    def test_finds_the_commands(self) -> None:
        """The extraction sees the commands a reader sees (so the tests below test something)."""
        firsts = {w[0] for _, w in COMMANDS}
        assert {"erp-broker", "docker", "kubectl", "python3", "curl"} <= firsts
        assert any(w[:2] == ["docker", "run"] for _, w in COMMANDS)
        assert sum(1 for where, _ in COMMANDS if where == "Dockerfile") >= 2

    def test_every_command_is_classified(self) -> None:
        unknown = {" ".join(w) for _, w in COMMANDS if w[0] not in KNOWN}
        assert not unknown, unknown


class TestImage:
    def test_one_image_name_everywhere(self) -> None:
        """`docker build -t` in the docs and the Dockerfile builds what kustomize renders, and
        every manifest names that image."""
        image = broker_image()
        built = {w[3] for _, w in COMMANDS if w[:3] == ["docker", "build", "-t"]}
        pushed = {w[2] for _, w in COMMANDS if w[:2] == ["docker", "push"]}
        run = {_docker_run_parts(w)[1] for _, w in COMMANDS if w[:2] == ["docker", "run"]}
        assert built == pushed == run == {image}
        name = image.rpartition(":")[0]
        for path in sorted(K8S.rglob("*.yaml")):
            for doc in load_yaml_docs(path):
                for container in _containers(doc) if isinstance(doc, dict) else []:
                    if container["name"] == "erp-broker":
                        assert container["image"].rpartition(":")[0] == name, path

    def test_kubectl_kustomize_renders_it(self) -> None:
        """`kubectl kustomize k8s/` (when kubectl is here) pulls the image the docs build."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            pytest.skip("kubectl is not installed; the Python rendering above stands in")
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        images = {
            c["image"]
            for doc in load_yaml_docs_text(result.stdout)
            for c in _containers(doc)
            if c["name"] == "erp-broker"
        }
        assert images == {broker_image()}


def load_yaml_docs_text(text: str) -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


class TestDockerRun:
    def test_docker_run_examples_work_as_written(self, tmp_path: Path) -> None:
        """What each `docker run` passes is what the broker needs: the config file it mounts
        exists, the variables its ${NAME} references read are passed, its ${file:} references
        are under the mounted /secrets, and the arguments after the image make `erp-broker run`
        listen on 0.0.0.0 (checked by loading the config as the container would)."""
        runs = [w for _, w in COMMANDS if w[:2] == ["docker", "run"]]
        assert len(runs) >= 2
        for command in runs:
            options, _image, args = _docker_run_parts(command)
            pairs = [v.rsplit(":", 1)[0].split(":", 1) for v in options["-v"]]
            mounts = {target: source for source, target in pairs}
            config_src = mounts["/etc/erp-broker/broker.yaml"].replace("$PWD", str(ROOT))
            text = Path(config_src).read_text()
            values = " ".join(config_strings(load_yaml(Path(config_src))))
            env_refs = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", values))
            assert env_refs <= set(options.get("-e", [])), command
            assert "/secrets" in mounts, command
            file_refs = re.findall(r"\$\{file:(/[^}]+)\}", values) + re.findall(
                r"(/\S+\.ionapi)\b", values
            )
            assert all(ref.startswith("/secrets/") for ref in file_refs)
            # The container: /secrets and the environment as docker passes them.
            secrets = tmp_path / "secrets"
            for ref in file_refs:
                target = secrets / ref.removeprefix("/secrets/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(
                    '{"ti":"T","ci":"c","cs":"s","iu":"https://gw","pu":"https://sso/T/as/","ot":"t","or":"r","saak":"a","sask":"b"}'
                    if ref.endswith(".ionapi")
                    else "value-x\n"
                )
            config = tmp_path / "broker.yaml"
            config.write_text(text.replace("/secrets/", f"{secrets}/"))
            parsed = build_parser().parse_args(["run", "-c", str(config), *args])
            overrides = {
                "listen": parsed.override_listen,
                "admin_listen": parsed.override_admin_listen,
            }
            env = {name: "value-x" for name in env_refs}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                loaded = load_config(config, {k: v for k, v in overrides.items() if v})
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            assert loaded.listen_address[0] == "0.0.0.0" and loaded.admin_address[0] == "0.0.0.0"
            published = {p.rsplit(":", 1)[1] for p in options["-p"]}
            assert {str(loaded.listen_address[1]), str(loaded.admin_address[1])} == published


class TestKubectl:
    def test_created_secrets_are_the_ones_mounted(self) -> None:
        """`kubectl create secret generic NAME --from-…=KEY=…` in the docs creates exactly the
        Secrets and keys the Deployment mounts (every one of them required)."""
        created: dict[str, set[str]] = {}
        for _, words in COMMANDS:
            if words[:4] != ["kubectl", "create", "secret", "generic"]:
                continue
            keys = created.setdefault(words[4], set())
            for word in words[5:]:
                if word.startswith(("--from-literal=", "--from-file=")):
                    keys.add(word.split("=", 2)[1])
        deployment = load_yaml(K8S / "deployment-native-sidecar.yaml")
        mounted: dict[str, set[str]] = {}
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            for source in volume.get("projected", {}).get("sources", []):
                secret = source["secret"]
                assert not secret.get("optional", False)
                mounted[secret["name"]] = {item["key"] for item in secret["items"]}
        assert created == mounted

    def test_configmap_does_not_call_a_required_secret_optional(self) -> None:
        configmap = (K8S / "configmap.yaml").read_text()
        assert "Optional" not in configmap and "optional" not in configmap.lower().replace(
            "optional:", ""
        )


class TestBrokerCommands:
    def test_every_documented_erp_broker_command_parses(self) -> None:
        """Every `erp-broker …` in the documents (also after `kubectl exec … --`) is accepted
        by the command line as written."""
        parser = build_parser()
        seen = 0
        for where, command in COMMANDS:
            words = command
            if "--" in words and "erp-broker" in words[words.index("--") :]:
                words = words[words.index("--") + 1 :]
            if words[0] != "erp-broker":
                continue
            args = [w for w in words[1:] if w not in ("NAME|--all",)]
            if args == ["test-connection"]:
                args.append("--all")
            try:
                parser.parse_args([a.replace("NAME", "ifs") for a in args])
            except SystemExit:
                pytest.fail(
                    f"{where}: {shlex.join(command)!r} is not a valid erp-broker command line"
                )
            seen += 1
        assert seen >= 8


def test_interpreter_is_a_virtualenv_or_ci() -> None:
    """The suite itself runs from a virtualenv (what the README and .ci/run set up)."""
    assert sys.prefix != sys.base_prefix


def test_secret_rotation_is_documented_as_the_code_does_it() -> None:
    """The guide says rotated Secrets are re-read every credentials_reload_interval (with the
    code's default), not that pods must be rolled."""
    from broker.config import Config

    text = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    default = Config.model_fields["credentials_reload_interval"].default
    assert f"`credentials_reload_interval` ({default:g} s by default)" in text
    assert "roll the pods" not in text
