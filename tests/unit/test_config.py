"""Config loading: references, validation messages with key paths, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.config import config_path, fingerprint, load_config, parse_config
from broker.errors import ConfigError
from broker.secrets import Secret

IFS = {
    "type": "ifs_apps10",
    "domain": "erp.example.com",
    "realm": "ifsapps",
    "client_id": "broker",
    "client_secret": "client-secret-value",
    "username": "IFSAPP",
    "password": "password-value",
}


def write(tmp_path: Path, data: object, name: str = "broker.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems(tmp_path: Path, data: object) -> list[str]:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


class TestReferences:
    def test_env_and_file_references_resolve(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """${NAME} reads the environment; ${file:/path} reads a file minus one trailing newline."""
        secret = tmp_path / "pw"
        secret.write_text("from-file\n")
        monkeypatch.setenv("IFS_USER", "svc")
        config = load_config(
            write(
                tmp_path,
                {
                    "connectors": {
                        "ifs": {**IFS, "username": "${IFS_USER}", "password": f"${{file:{secret}}}"}
                    }
                },
            )
        )
        ifs = config.connectors["ifs"]
        assert ifs.username == "svc"  # type: ignore[union-attr]
        assert ifs.password.get() == "from-file"  # type: ignore[union-attr]

    def test_unset_variable_names_the_key(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unresolvable reference is an error naming file, key path and variable."""
        monkeypatch.delenv("NOPE_NOT_SET", raising=False)
        lines = problems(tmp_path, {"connectors": {"ifs": {**IFS, "password": "${NOPE_NOT_SET}"}}})
        assert lines == [
            f"{tmp_path / 'broker.yaml'}: connectors.ifs.password: environment variable NOPE_NOT_SET is not set"
        ]

    def test_missing_file_names_the_key(self, tmp_path: Path) -> None:
        """A ${file:} that cannot be read is an error, never an empty string."""
        lines = problems(
            tmp_path,
            {"connectors": {"ifs": {**IFS, "client_secret": "${file:/nonexistent/secret}"}}},
        )
        assert len(lines) == 1
        assert "connectors.ifs.client_secret: cannot read /nonexistent/secret" in lines[0]

    def test_empty_file_is_an_error(self, tmp_path: Path) -> None:
        """An empty secret file is reported, not used as an empty password."""
        empty = tmp_path / "empty"
        empty.write_text("\n")
        lines = problems(
            tmp_path, {"connectors": {"ifs": {**IFS, "password": f"${{file:{empty}}}"}}}
        )
        assert "connectors.ifs.password" in lines[0] and "empty" in lines[0]


class TestValidation:
    @pytest.mark.parametrize(
        ("change", "where", "text"),
        [
            ({"domain": "https://erp.example.com"}, "connectors.ifs.domain", "hostname only"),
            ({"domain": "erp.example.com/"}, "connectors.ifs.domain", "trailing slash"),
            ({"colour": "blue"}, "connectors.ifs.colour", "unknown key"),
            ({"client_id": None}, "connectors.ifs.client_id", ""),
            ({"timeout": -1}, "connectors.ifs.timeout", "greater than 0"),
            ({"type": "sap"}, "connectors.ifs", "type must be one of"),
            ({"base_url": "ftp://x"}, "connectors.ifs.base_url", "http(s) URL"),
            ({"route": "/a/../b/"}, "connectors.ifs.route", "path prefix"),
        ],
    )
    def test_bad_connector_key(
        self, tmp_path: Path, change: dict[str, object], where: str, text: str
    ) -> None:
        """Each bad value is one line: <file>: <key path>: <what is wrong>."""
        lines = problems(tmp_path, {"connectors": {"ifs": {**IFS, **change}}})
        assert any(
            line.startswith(f"{tmp_path / 'broker.yaml'}: {where}") and text in line
            for line in lines
        ), lines

    def test_missing_required_key(self, tmp_path: Path) -> None:
        """A missing credential is named."""
        data = {k: v for k, v in IFS.items() if k != "password"}
        assert problems(tmp_path, {"connectors": {"ifs": data}}) == [
            f"{tmp_path / 'broker.yaml'}: connectors.ifs.password: required key is missing"
        ]

    def test_every_problem_is_reported(self, tmp_path: Path) -> None:
        """Several problems give several lines, not just the first."""
        lines = problems(
            tmp_path,
            {"listen": "nope", "bogus": 1, "connectors": {"ifs": {**IFS, "domain": "https://x"}}},
        )
        assert len(lines) == 3

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """Unknown keys are rejected at every level."""
        assert problems(tmp_path, {"connectors": {"ifs": IFS}, "lisen": "x"}) == [
            f"{tmp_path / 'broker.yaml'}: lisen: unknown key"
        ]

    def test_duplicate_routes(self, tmp_path: Path) -> None:
        """Two connectors may not share a route."""
        lines = problems(
            tmp_path, {"connectors": {"a": {**IFS, "route": "/x/"}, "b": {**IFS, "route": "x"}}}
        )
        assert "both use route /x/" in lines[0]

    def test_yaml_syntax_error_has_a_line(self, tmp_path: Path) -> None:
        """Broken YAML names the line."""
        lines = problems(tmp_path, "connectors:\n  ifs: [unclosed\n")
        assert "line" in lines[0]

    def test_domain_or_base_url_required(self, tmp_path: Path) -> None:
        """A connector needs somewhere to go."""
        data = {k: v for k, v in IFS.items() if k != "domain"}
        lines = problems(tmp_path, {"connectors": {"ifs": data}})
        assert "set domain" in lines[0]

    def test_base_url_wins_and_route_defaults_to_name(self) -> None:
        """base_url stands in for https://<domain>; the route defaults to /<name>/."""
        config = parse_config({"connectors": {"ifs": {**IFS, "base_url": "http://127.0.0.1:9/x/"}}})
        assert config.connectors["ifs"].upstream_base() == "http://127.0.0.1:9/x"
        assert config.route_of("ifs") == "/ifs/"
        assert config.connectors["ifs"].resolved_token_url() == (  # type: ignore[union-attr]
            "http://127.0.0.1:9/x/auth/realms/ifsapps/protocol/openid-connect/token"
        )


class TestSecrets:
    def test_redacted_config_masks_every_secret(self) -> None:
        """The printable config holds no secret value."""
        config = parse_config({"connectors": {"ifs": IFS}})
        text = repr(config) + str(config.redacted()) + repr(config.connectors["ifs"])
        assert "client-secret-value" not in text and "password-value" not in text
        assert config.redacted()["connectors"]["ifs"]["password"] == "***"

    def test_secret_repr(self) -> None:
        """Secret never shows its value."""
        assert "hunter2-long" not in repr(Secret("hunter2-long")) + str(Secret("hunter2-long"))

    def test_fingerprint_follows_content_not_paths(self, tmp_path: Path) -> None:
        """The same secret at two paths fingerprints alike; another password does not."""
        a, b = tmp_path / "a", tmp_path / "b"
        a.write_text("same-password")
        b.write_text("same-password")
        one = parse_config({"connectors": {"ifs": {**IFS, "password": f"${{file:{a}}}"}}})
        two = parse_config({"connectors": {"ifs": {**IFS, "password": f"${{file:{b}}}"}}})
        three = parse_config({"connectors": {"ifs": {**IFS, "password": "rotated-password"}}})
        assert fingerprint(one.connectors["ifs"]) == fingerprint(two.connectors["ifs"])
        assert fingerprint(one.connectors["ifs"]) != fingerprint(three.connectors["ifs"])


class TestConfigPath:
    def test_precedence(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """-c wins, then $ERP_BROKER_CONFIG, then ./config/broker.yaml."""
        monkeypatch.delenv("ERP_BROKER_CONFIG", raising=False)
        assert config_path(None) == "./config/broker.yaml"
        monkeypatch.setenv("ERP_BROKER_CONFIG", "/etc/b.yaml")
        assert config_path(None) == "/etc/b.yaml"
        assert config_path("x.yaml") == "x.yaml"
