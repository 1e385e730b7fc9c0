"""The container image: Dockerfile and .dockerignore. (No Docker engine is needed: the
Dockerfile is linted and read, not built.)"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from .support import DOCKERFILE, ROOT, output_of, require_tool, run

BASE_IMAGE = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cc", "rustc", "cargo")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    parsed: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, argument = (pending + line).partition(" ")
        parsed.append(Instruction(keyword.upper(), argument.strip()))
        pending = ""
    return parsed


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions():
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def final_stage() -> list[Instruction]:
    return stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    (found,) = [i for i in stage if i.keyword == keyword]
    return found


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.argument):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


class TestDockerfile:
    def test_hadolint_is_clean(self) -> None:
        """hadolint reports nothing, not even style or info findings."""
        hadolint = require_tool("hadolint")
        result = run(hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
        assert result.returncode == 0, output_of(result)
        assert result.stdout.strip() == "", output_of(result)

    def test_is_multi_stage_on_a_pinned_slim_python_311(self) -> None:
        """A builder stage and a final stage, both FROM the same pinned python:3.11.x slim
        bookworm image (the virtualenv built in the first runs on the second's Python)."""
        froms = [stage[0].argument.split() for stage in stages()]
        assert len(froms) >= 2
        images = {words[0] for words in froms}
        assert len(images) == 1, images
        assert BASE_IMAGE.match(images.pop())
        assert [word.lower() for word in froms[0][1:]] == ["as", "builder"]

    def test_final_stage_copies_only_the_built_virtualenv(self) -> None:
        """The final stage gets the application from the builder, never from the build
        context, and installs no compilers or build tools."""
        stage = final_stage()
        copies = [i.argument for i in stage if i.keyword in ("COPY", "ADD")]
        assert copies and all(c.startswith("--from=builder ") for c in copies), copies
        for run_instruction in (i for i in stage if i.keyword == "RUN"):
            words = set(re.split(r"[\s;&|]+", run_instruction.argument))
            assert not words & set(COMPILERS), run_instruction.argument

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        """USER is a numeric UID:GID other than 0, so Kubernetes' runAsNonRoot can check it."""
        user = only(final_stage(), "USER").argument
        assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user), user
        assert user.split(":")[0] == "10001"

    def test_entrypoint_ports_and_config(self) -> None:
        """ENTRYPOINT ["erp-broker", "run"], ports 8080 (proxy) and 9090 (admin), the config at
        /etc/erp-broker/broker.yaml via ERP_BROKER_CONFIG."""
        stage = final_stage()
        assert json.loads(only(stage, "ENTRYPOINT").argument) == ["erp-broker", "run"]
        assert only(stage, "EXPOSE").argument.split() == ["8080", "9090"]
        assert env_of(stage)["ERP_BROKER_CONFIG"] == "/etc/erp-broker/broker.yaml"

    def test_ready_for_a_read_only_root_filesystem(self) -> None:
        """Nothing writes to the image at run time: no .pyc files, and the token store's
        directory is a volume owned by the runtime user."""
        stage = final_stage()
        assert env_of(stage)["PYTHONDONTWRITEBYTECODE"] == "1"
        assert json.loads(only(stage, "VOLUME").argument) == ["/var/lib/erp-broker"]
        assert any(
            i.keyword == "RUN" and "chown 10001:10001 /var/lib/erp-broker" in i.argument
            for i in stage
        )

    def test_healthcheck_uses_python_not_curl(self) -> None:
        """The HEALTHCHECK probes /healthz with Python's urllib: the slim image has no curl."""
        healthcheck = only(final_stage(), "HEALTHCHECK").argument
        assert "/healthz" in healthcheck and "urllib" in healthcheck
        assert "curl" not in healthcheck and "wget" not in healthcheck

    def test_build_tools_are_pinned(self) -> None:
        """pip, setuptools and wheel in the builder are pinned to exact versions."""
        installs = " ".join(i.argument for i in stages()[0] if i.keyword == "RUN")
        for tool in ("pip", "setuptools", "wheel"):
            assert re.search(rf"\b{tool}==\d+(\.\d+)+\b", installs), tool


class TestDockerignore:
    def patterns(self) -> list[str]:
        lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def test_is_an_allow_list_of_what_the_build_reads(self) -> None:
        """Everything is excluded except what `pip wheel .` reads, so secrets, local token
        stores, .git and tests never reach the build context."""
        patterns = self.patterns()
        assert patterns[0] == "*"
        allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
        assert {"pyproject.toml", "README.md", "broker"} <= allowed
        assert not allowed & {".git", "tests", "k8s", "config", ".ci", "bench"}

    def test_copied_paths_are_allowed(self) -> None:
        """Every path the builder COPYs from the context is let through by .dockerignore."""
        allowed = {p[1:].rstrip("/") for p in self.patterns() if p.startswith("!")}
        for instruction in stages()[0]:
            if instruction.keyword == "COPY" and not instruction.argument.startswith("--from"):
                *sources, _ = instruction.argument.split()
                assert set(sources) <= allowed, sources

    def test_drops_bytecode_and_token_stores(self) -> None:
        """Bytecode caches and SQLite token stores are excluded even inside allowed folders."""
        patterns = set(self.patterns())
        assert {"**/__pycache__", "**/*.db"} <= patterns


class TestPinnedDependencies:
    def test_lock_pins_every_runtime_dependency(self) -> None:
        """requirements.lock pins (==) every dependency pyproject.toml declares, and the image uses it."""
        import re
        import tomllib

        from .support import DOCKERFILE, ROOT

        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        names = {
            re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared
        }
        pinned = {}
        for line in (ROOT / "requirements.lock").read_text().splitlines():
            if line and not line.startswith("#"):
                name, sep, version = line.partition("==")
                assert sep and version, f"not pinned: {line}"
                pinned[name.lower().replace("_", "-")] = version
        assert names <= set(pinned), names - set(pinned)
        text = DOCKERFILE.read_text()
        assert (
            "-c requirements.lock" in text
            and "requirements.lock" in (ROOT / ".dockerignore").read_text()
        )
