"""Configuration: YAML, secret references, and frozen pydantic models validated once.

``load_config(path)`` is the only entry point. It reads the YAML, resolves ``${NAME}`` and
``${file:/path}`` references, reads ``.ionapi`` files, and validates everything, collecting
every problem as one line ``<file>: <key.path>: <what is wrong>`` before raising
:class:`~broker.errors.ConfigError`. A config that loads is complete: nothing is resolved later.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    field_serializer,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .http1 import KEEPALIVE_TIMEOUT
from .redis_url import check_redis_url
from .secrets import MASK, Secret
from .server import KEEPALIVE_TIMEOUT as LISTENER_KEEPALIVE
from .server import LINGERING_TIME

DEFAULT_CONFIG_PATH = "./config/broker.yaml"
CONFIG_ENV = "ERP_BROKER_CONFIG"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
DEFAULT_SQLITE_PATH = "./erp-broker.db"
DEFAULT_TIMEOUT = 60.0  # the Infor gateway's own limit for one request
DEFAULT_TOKEN_TIMEOUT = 10.0
DEFAULT_REPLAY_MAX_BYTES = 1024 * 1024
DEFAULT_GRACE_PERIOD = 10.0
#: The Redis refresh lock's lease: how long a replica that died holding it delays the others.
DEFAULT_LOCK_LEASE = 10.0

IFS_PROJECTION_BASE = "main/ifsapplications/projection/v1"
PSO_SESSION_PATH = "IFSSchedulingRESTfulGateway/api/v1/scheduling/session"
INFOR_CHECK_PATH = "ifsservice/usermgt/v2/users/me"

#: A model-level problem about named keys: "<marker>key1,key2:text" (see parse_config).
KEY_PROBLEM = "@keys:"

_REFERENCE = re.compile(r"\$\{(?P<body>[^}]*)\}")

#: Cross-field checks. The models raise them; when another problem in the same place keeps a
#: model's own check from running, the loader reports them from the raw data (one run, every
#: problem).
NEED_LOCATION = "set domain (a hostname) or base_url (a full URL)"
NEED_REALM = "set realm (the Keycloak realm) or token_url"
NEED_ONE_IONAPI = "set exactly one of ionapi_file (a path) or ionapi (its JSON)"
SAME_LISTEN = "listen and admin_listen must differ"


def _same_route(first: str, second: str, route: str) -> str:
    return f"connectors {first} and {second} both use route {route}"


def _to_secret(value: Any) -> Any:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return Secret(value)
    raise ValueError("must be a string")


SecretStr = Annotated[
    Secret,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda _s: MASK, return_type=str),
    WithJsonSchema({"type": "string", "writeOnly": True}),
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def _parse_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be host:port, e.g. 127.0.0.1:8080 (got {value!r})")
    return host.strip("[]"), int(port)


class RetrySettings(_Model):
    """Retries of 429 and 504 answers, per request."""

    max_retries: int = Field(default=3, ge=0, le=20)
    max_wait: float = Field(default=30.0, gt=0, description="no single wait is longer")
    max_total: float = Field(default=60.0, gt=0, description="waits of one request in all")
    base_delay: float = Field(default=0.5, gt=0, description="first backoff without Retry-After")
    max_queue: int = Field(
        default=1000, ge=1, description="requests that may wait out one rate-limit window"
    )


class RateLimit(_Model):
    """At most ``requests`` ERP requests in any sliding ``per_seconds`` window."""

    requests: int = Field(ge=1)
    per_seconds: float = Field(gt=0)
    max_wait: float = Field(default=10.0, ge=0, description="longest wait for the budget")


class LoginBackoff(_Model):
    """How logins are spaced out after the ERP rejected the configured credentials."""

    initial: float = Field(default=30.0, gt=0)
    max: float = Field(default=900.0, gt=0)
    max_failures: int = Field(
        default=5, ge=1, description="rejections in a row before logins pause until told"
    )


class ResponseMatcher(_Model):
    """An ERP answer that means something besides its status (``auth_failure``, ``retry_on``).

    ``body``: a text the body must contain; ``json_code``: the ``Code`` a JSON object body must
    carry at its top level. Bodies are inspected only when small (<= 64 KiB, with a
    Content-Length) and not compressed.
    """

    status: int = Field(ge=100, le=599)
    body: str | None = Field(default=None, min_length=1)
    json_code: int | None = None
    any_method: bool = False


#: PSO Gateways answer a dead session on a data call with these (erp-protocols.md); any 401
#: is a rejected credential anyway.
PSO_AUTH_FAILURE = (
    ResponseMatcher(status=400, body="AUTHENTICATION_FAILED"),
    ResponseMatcher(status=400, body="INVALID_SESSION"),
    ResponseMatcher(status=200, json_code=401),
)
#: IFS raises it before executing anything after a metadata change; IFS says retry once.
IFS_RETRY_ON = (ResponseMatcher(status=500, body="MI_MODIFIED_ERROR", any_method=True),)


class ConnectorBase(_Model):
    """Settings every connector takes."""

    domain: str | None = None
    base_url: str | None = None
    route: str | None = None
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    #: Seconds an idle connection to the ERP may wait in the pool to be reused: below the
    #: ERP's own keep-alive timeout (Apache httpd's default is 5 s).
    keepalive_timeout: float = Field(default=KEEPALIVE_TIMEOUT, gt=0)
    token_timeout: float = Field(default=DEFAULT_TOKEN_TIMEOUT, gt=0)
    ca_file: str | None = None
    tls_verify: bool = True
    replay_max_bytes: int = Field(default=DEFAULT_REPLAY_MAX_BYTES, ge=0)
    auth_failure_statuses: tuple[int, ...] = ()
    retry: RetrySettings = RetrySettings()
    rate_limit: RateLimit | None = None
    default_token_lifetime: float = Field(default=300.0, gt=0)
    refresh_ahead: float | None = Field(default=None, ge=0)
    login_backoff: LoginBackoff = LoginBackoff()
    #: JSON answers' ERP URLs rewritten to the broker's (headers' always are): see links.py.
    rewrite_links: bool = False
    #: When the service account's password or client secret expires (a date, UTC midnight).
    credentials_expire: datetime.date | None = None
    #: None: the connector type's defaults (an empty list: none).
    auth_failure: tuple[ResponseMatcher, ...] | None = None
    retry_on: tuple[ResponseMatcher, ...] | None = None

    DEFAULT_AUTH_FAILURE: ClassVar[tuple[ResponseMatcher, ...]] = ()
    DEFAULT_RETRY_ON: ClassVar[tuple[ResponseMatcher, ...]] = ()

    def auth_failure_matchers(self) -> tuple[ResponseMatcher, ...]:
        """``auth_failure`` (or the type's defaults) plus the short form's statuses."""
        listed = self.DEFAULT_AUTH_FAILURE if self.auth_failure is None else self.auth_failure
        return (*listed, *(ResponseMatcher(status=s) for s in self.auth_failure_statuses))

    def retry_on_matchers(self) -> tuple[ResponseMatcher, ...]:
        return self.DEFAULT_RETRY_ON if self.retry_on is None else self.retry_on

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" in value:
            raise ValueError(
                f"domain is a hostname only: write {urlsplit(value).netloc or 'host'!r} "
                "without the scheme (or set base_url to a full URL)"
            )
        if value.endswith("/") or "/" in value:
            raise ValueError(
                f"domain is a hostname only: write {value.split('/')[0]!r} without a path "
                "or trailing slash"
            )
        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?", value):
            raise ValueError(f"{value!r} is not a hostname (optionally with :port)")
        return value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"base_url must be a full http(s) URL, e.g. https://host (got {value!r})"
            )
        if parts.query or parts.fragment:
            raise ValueError("base_url must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("route")
    @classmethod
    def _check_route(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"/?([A-Za-z0-9._~\-]+/)*[A-Za-z0-9._~\-]+/?", value) or any(
            seg in (".", "..") for seg in value.strip("/").split("/")
        ):
            raise ValueError(f"route must be a path prefix like /erp/ifs/ (got {value!r})")
        return "/" + value.strip("/") + "/"

    @field_validator("auth_failure_statuses")
    @classmethod
    def _check_statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for status in value:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP error status")
        return value

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: str | None) -> str | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read CA file {value}")
        return value

    def upstream_base(self) -> str:
        """Where ``/<route>/<rest>`` goes: ``<upstream_base>/<rest>``."""
        if self.base_url:
            return self.base_url
        assert self.domain is not None  # checked by _require_location
        return f"https://{self.domain}"

    def _require_location(self) -> None:
        if not self.domain and not self.base_url:
            raise ValueError(NEED_LOCATION)


class IfsApps10Config(ConnectorBase):
    DEFAULT_RETRY_ON: ClassVar[tuple[ResponseMatcher, ...]] = IFS_RETRY_ON

    type: Literal["ifs_apps10"]
    auth: Literal["password", "client_credentials", "basic"] = "password"
    realm: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    token_url: str | None = None
    token_params: dict[str, str] = Field(default_factory=dict)
    inject: Literal["access_token", "id_token"] = "access_token"
    scope: str = "openid"
    test_path: str = f"{IFS_PROJECTION_BASE}/AllProjections.svc/Projections"
    projection_base: str = IFS_PROJECTION_BASE
    projections_path: str = f"{IFS_PROJECTION_BASE}/AllProjections.svc/Projections"
    rewrite_links: bool = True  # OData answers carry the ERP's absolute URLs

    @model_validator(mode="after")
    def _check(self) -> IfsApps10Config:
        self._require_location()
        needed = {
            "password": ("client_id", "client_secret", "username", "password"),
            "client_credentials": ("client_id", "client_secret"),
            "basic": ("username", "password"),
        }[self.auth]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            # Reported at each key's own path (see parse_config).
            raise ValueError(f"{KEY_PROBLEM}{','.join(missing)}:required key is missing")
        if self.auth != "basic" and not self.realm and not self.token_url:
            raise ValueError(NEED_REALM)
        if self.auth == "basic" and self.inject != "access_token":
            raise ValueError("inject applies to token grants, not to auth: basic")
        return self

    def resolved_token_url(self) -> str:
        if self.token_url:
            if "://" in self.token_url:
                return self.token_url
            return f"{self.upstream_base()}/{self.token_url.lstrip('/')}"
        return f"{self.upstream_base()}/auth/realms/{self.realm}/protocol/openid-connect/token"

    def fingerprint_material(self) -> list[str]:
        return [
            self.auth,
            "" if self.auth == "basic" else self.resolved_token_url(),
            self.client_id or "",
            self.client_secret.get() if self.client_secret else "",
            self.username or "",
            self.password.get() if self.password else "",
            self.inject,
            *(f"{k}={v}" for k, v in sorted(self.token_params.items())),
        ]


class IfsPsoConfig(ConnectorBase):
    DEFAULT_AUTH_FAILURE: ClassVar[tuple[ResponseMatcher, ...]] = PSO_AUTH_FAILURE

    type: Literal["ifs_pso"]
    account_id: str
    username: str
    password: SecretStr
    session_ttl: float | None = Field(default=None, gt=0)
    session_path: str = PSO_SESSION_PATH

    @model_validator(mode="after")
    def _check(self) -> IfsPsoConfig:
        self._require_location()
        return self

    def session_url(self) -> str:
        return f"{self.upstream_base()}/{self.session_path.lstrip('/')}"

    def fingerprint_material(self) -> list[str]:
        return [self.session_url(), self.account_id, self.username, self.password.get()]


class IonApi(_Model):
    """The content of an Infor ``.ionapi`` file (keys as Infor writes them)."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    ti: str
    ci: str
    cs: SecretStr
    iu: str
    pu: str
    ot: str
    or_: str = Field(alias="or")
    saak: SecretStr
    sask: SecretStr
    cn: str | None = None
    oa: str | None = None
    ev: str | None = None
    v: str | None = None
    #: The file it was read from, if any: what `check` shows instead of the content.
    _path: str | None = PrivateAttr(default=None)

    @staticmethod
    def join(base: str, path: str) -> str:
        """Join ``pu`` and a path without doubling or dropping a slash."""
        if "://" in path:
            return path
        return base.rstrip("/") + "/" + path.lstrip("/")

    def token_url(self) -> str:
        return self.join(self.pu, self.ot)

    def revoke_url(self) -> str:
        return self.join(self.pu, self.or_)


def _read_ionapi(value: Any) -> Any:
    """Accept a path, JSON text or a mapping; fold ``SAAK``/``SASK`` to lower case."""
    if isinstance(value, IonApi):
        return value
    data: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            try:
                text = Path(value).read_text(encoding="utf-8-sig")
            except OSError as exc:
                raise ValueError(f"cannot read .ionapi file {value}: {exc.strerror}") from None
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ValueError("the .ionapi content is not valid JSON") from None
    if not isinstance(data, Mapping):
        raise ValueError("the .ionapi content must be a JSON object")
    folded = {}
    for key, item in data.items():
        lower = key.lower()
        folded[lower if lower in ("saak", "sask") else key] = item
    return folded


def _read_ionapi_file(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """As :func:`_read_ionapi`, remembering the path the content came from."""
    ion = handler(_read_ionapi(value))
    if isinstance(ion, IonApi) and isinstance(value, str) and not value.strip().startswith("{"):
        ion._path = value
    return ion


class InforIonConfig(ConnectorBase):
    type: Literal["infor_ion"]
    ionapi_file: Annotated[IonApi | None, WrapValidator(_read_ionapi_file)] = None
    ionapi: Annotated[IonApi | None, BeforeValidator(_read_ionapi)] = None
    tenant_in_path: bool = True
    grant_keepalive_days: float = Field(default=25.0, gt=0)
    #: An Infor refresh grant dies after this many idle days (Infor's default: 30).
    grant_lifetime_days: float = Field(default=30.0, gt=1)
    revoke_on_shutdown: bool = True

    @model_validator(mode="after")
    def _check(self) -> InforIonConfig:
        if (self.ionapi_file is None) == (self.ionapi is None):
            raise ValueError(NEED_ONE_IONAPI)
        return self

    @field_serializer("ionapi_file", mode="wrap")
    def _show_ionapi_path(self, value: IonApi | None, nxt: SerializerFunctionWrapHandler) -> Any:
        return value._path if value is not None and value._path else nxt(value)

    @property
    def ion(self) -> IonApi:
        ion = self.ionapi_file or self.ionapi
        assert ion is not None
        return ion

    def upstream_base(self) -> str:
        base = self.base_url or self.ion.iu.rstrip("/")
        return f"{base}/{self.ion.ti}" if self.tenant_in_path else base

    def fingerprint_material(self) -> list[str]:
        ion = self.ion
        return [ion.token_url(), ion.ci, ion.cs.get(), ion.saak.get(), ion.sask.get()]


ConnectorConfig = Annotated[
    IfsApps10Config | IfsPsoConfig | InforIonConfig, Field(discriminator="type")
]
CONNECTOR_TYPES = ("ifs_apps10", "ifs_pso", "infor_ion")


class StoreConfig(_Model):
    sqlite: str | None = None
    redis: str | None = None
    redis_password: SecretStr | None = None
    encryption_key: SecretStr | None = None
    previous_encryption_keys: tuple[SecretStr, ...] = ()
    timeout: float = Field(default=2.0, gt=0, description="seconds for one store call")
    lock_lease: float = Field(
        default=DEFAULT_LOCK_LEASE, ge=1, le=30, description="Redis refresh lock lease, seconds"
    )

    @field_serializer("redis")
    def _mask_redis(self, value: str | None) -> str | None:
        return None if value is None else mask_url_password(value)

    @model_validator(mode="after")
    def _check(self) -> StoreConfig:
        if self.sqlite and self.redis:
            raise ValueError("set either sqlite or redis, not both")
        return self

    @field_validator("redis")
    @classmethod
    def _check_redis(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @property
    def sqlite_path(self) -> str:
        return self.sqlite or DEFAULT_SQLITE_PATH


class ClientTimeouts(_Model):
    """Seconds the listeners wait for the app (nginx's defaults; keep-alive and lingering
    aiohttp's). The admin listener has the same."""

    header: float = Field(default=60.0, gt=0, description="for a request's head, then 408")
    body: float = Field(default=60.0, gt=0, description="between two body pieces, then 408")
    write: float = Field(default=60.0, gt=0, description="for an app that reads nothing")
    keepalive: float = Field(
        default=LISTENER_KEEPALIVE, gt=0, description="an idle keep-alive connection, then closed"
    )
    lingering: float = Field(
        default=LINGERING_TIME, gt=0, description="reading and dropping what a closed app sends"
    )


#: What ``tracing`` needs installed: the ``otel`` extra.
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")


class TracingConfig(_Model):
    """OpenTelemetry spans over OTLP/HTTP (``broker/tracing.py``)."""

    otlp_endpoint: str
    service_name: str = Field(default="erp-broker", min_length=1)
    sample_ratio: float = Field(default=1.0, ge=0, le=1)

    @field_validator("otlp_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"otlp_endpoint must be an http(s) URL, e.g. http://otel-collector:4318 "
                f"(got {value!r})"
            )
        return value.rstrip("/")

    @field_serializer("otlp_endpoint")
    def _mask_endpoint(self, value: str) -> str:
        return mask_url_password(value)

    @model_validator(mode="after")
    def _check_installed(self) -> TracingConfig:
        for module in OTEL_MODULES:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ValueError(
                    "tracing needs OpenTelemetry, which is not installed: "
                    "pip install 'erp-broker[otel]'"
                ) from None
        return self


class Config(_Model):
    listen: str = DEFAULT_LISTEN
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    store: StoreConfig = StoreConfig()
    connectors: dict[str, ConnectorConfig]
    grace_period: float = Field(default=DEFAULT_GRACE_PERIOD, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    access_log: bool = True
    admin_token: SecretStr | None = None
    #: Seconds between re-reads of the config's secret files (0: never). A rotated password
    #: in a mounted Secret is picked up without a restart.
    credentials_reload_interval: float = Field(default=10.0, ge=0)
    #: The proxy listener's timeouts towards the app.
    client_timeouts: ClientTimeouts = ClientTimeouts()
    tracing: TracingConfig | None = None
    #: Where the config came from, for messages; not a YAML key.
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("listen", "admin_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        _parse_hostport(value, "a listen address")
        return value

    @field_validator("connectors")
    @classmethod
    def _check_connectors(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("at least one connector is needed")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
                raise ValueError(f"connector name {name!r}: use letters, digits, '-' and '_'")
        return value

    @model_validator(mode="after")
    def _check_routes(self) -> Config:
        seen: dict[str, str] = {}
        for name in self.connectors:
            route = self.route_of(name)
            if route in seen:
                raise ValueError(_same_route(seen[route], name, route))
            seen[route] = name
        if self.listen_address == self.admin_address and self.listen_address[1] != 0:
            raise ValueError(SAME_LISTEN)
        return self

    def route_of(self, name: str) -> str:
        return self.connectors[name].route or f"/{name}/"

    @property
    def listen_address(self) -> tuple[str, int]:
        return _parse_hostport(self.listen, "listen")

    @property
    def admin_address(self) -> tuple[str, int]:
        return _parse_hostport(self.admin_listen, "admin_listen")

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, every secret masked: safe to print or log."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        for name, connector in data["connectors"].items():
            connector.setdefault("route", self.route_of(name))
        return data


def mask_url_password(url: str) -> str:
    """``redis://user:***@host/0``: a URL as it may be printed or logged."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", rf"\1:{MASK}@", url)
    return re.sub(r"([?&]password=)[^&#]*", rf"\1{MASK}", url)


def fingerprint(connector: ConnectorConfig) -> str:
    """A digest of the connector's credential *content* (not of file paths).

    Tokens are stored under it, so a rotated password or client secret never reuses tokens
    issued for the old one, while replicas that mount the same secret at different paths agree.
    """
    digest = hashlib.sha256(connector.type.encode())
    for item in connector.fingerprint_material():
        digest.update(b"\0" + item.encode())
    return digest.hexdigest()


# -- loading ---------------------------------------------------------------------------------


def config_path(explicit: str | None) -> str:
    """``-c/--config``, else ``$ERP_BROKER_CONFIG``, else ``./config/broker.yaml``."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def _resolve_string(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        body = match.group("body").strip()
        if body.startswith("file:"):
            path = body[5:]
            try:
                content = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read {path}: {exc.strerror}") from None
            if content.endswith("\n"):
                content = content[:-1]
                if content.endswith("\r"):
                    content = content[:-1]
            if not content:
                raise ValueError(f"file {path} is empty")
            return content
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", body):
            raise ValueError(
                f"${{{body}}} is not a valid reference: use ${{NAME}} or ${{file:/path}}"
            )
        if body not in env:
            raise ValueError(f"environment variable {body} is not set")
        if not env[body]:
            raise ValueError(f"environment variable {body} is empty")
        return env[body]

    resolved = _REFERENCE.sub(replace, text)
    if "${" in _REFERENCE.sub("", text):
        # Taken literally, it would become part of a password: say so instead.
        raise ValueError("a reference is not closed: write ${NAME} or ${file:/path}, with the '}'")
    return resolved


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """Yield (key path, container, key) for every string leaf."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                yield (*path, str(key)), node, key
            else:
                yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if isinstance(value, str):
                yield (*path, str(index)), node, index
            else:
                yield from _walk(value, (*path, str(index)))


def resolve_references(
    data: Any, env: Mapping[str, str] | None = None
) -> tuple[Any, list[tuple[str, str]]]:
    """Substitute ``${NAME}`` and ``${file:/path}`` in place; return (data, problems)."""
    env = os.environ if env is None else env
    problems: list[tuple[str, str]] = []
    for path, container, key in list(_walk(data, ())):
        value = container[key]
        if "${" not in value:
            continue
        try:
            container[key] = _resolve_string(value, env)
        except ValueError as exc:
            problems.append((".".join(path), str(exc)))
    return data, problems


def _location(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    # A discriminated union puts the tag in the path: connectors.ifs.ifs_apps10.domain.
    if len(parts) >= 3 and parts[0] == "connectors" and parts[2] in CONNECTOR_TYPES:
        del parts[2]
    # Validators of a nested model report under a synthetic name; drop it.
    return ".".join(p for p in parts if not p.startswith("function-"))


def _problem_text(error: Mapping[str, Any]) -> str:
    message = str(error["msg"])
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "union_tag_invalid":
        return f"type must be one of {', '.join(CONNECTOR_TYPES)}"
    if error["type"] == "union_tag_not_found":
        return f"type is required (one of {', '.join(CONNECTOR_TYPES)})"
    return message


def _blocked_checks(data: Mapping[str, Any], failed: set[str]) -> list[tuple[str, str]]:
    """The cross-field checks a model could not make because another problem in it stopped
    its validation first, made on the raw data: every problem is reported in one run.

    ``failed`` holds the key paths already reported; a check whose own keys failed is skipped.
    """

    def failed_under(prefix: str) -> bool:
        return any(path == prefix or path.startswith(prefix + ".") for path in failed)

    problems: list[tuple[str, str]] = []
    connectors = data.get("connectors")
    routes: dict[str, str] = {}
    if isinstance(connectors, Mapping):
        for name, raw in connectors.items():
            where = f"connectors.{name}"
            if not isinstance(raw, Mapping):
                continue
            route = raw.get("route") or name
            if isinstance(route, str) and f"{where}.route" not in failed:
                routes[str(name)] = "/" + route.strip("/") + "/"
            if not failed_under(where) or where in failed:
                continue  # the model's own checks ran, or it failed as a whole
            kind = raw.get("type")
            if kind in ("ifs_apps10", "ifs_pso") and not raw.get("domain"):
                if not raw.get("base_url"):
                    problems.append((where, NEED_LOCATION))
            if (
                kind == "ifs_apps10"
                and raw.get("auth", "password") != "basic"
                and not raw.get("realm")
                and not raw.get("token_url")
            ):
                problems.append((where, NEED_REALM))
            if kind == "infor_ion" and ("ionapi_file" in raw) == ("ionapi" in raw):
                problems.append((where, NEED_ONE_IONAPI))
    if failed and "(top level)" not in failed:  # Config's own checks did not run
        seen: dict[str, str] = {}
        for name, route in routes.items():
            if route in seen:
                problems.append(("connectors", _same_route(seen[route], name, route)))
            seen.setdefault(route, name)
        listen, admin = data.get("listen"), data.get("admin_listen")
        if isinstance(listen, str) and listen == admin and not listen.endswith(":0"):
            problems.append(("(top level)", SAME_LISTEN))
    return problems


def parse_config(
    data: Any,
    source: str = "<memory>",
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate already-parsed YAML data (references are resolved here).

    ``overrides`` replace top-level keys (the command line's ``--listen``, say).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys"])
    data.update(overrides or {})
    data, ref_problems = resolve_references(data, env)
    problems = [f"{source}: {path}: {text}" for path, text in ref_problems]
    failed_paths = {path for path, _ in ref_problems}
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        reported = set(failed_paths)
        for error in exc.errors(include_input=False, include_url=False):
            where = _location(error["loc"]) or "(top level)"
            reported.add(where)
            # A reference that could not be resolved is reported once, as such.
            if where in failed_paths:
                continue
            text = _problem_text(error)
            if text.startswith(KEY_PROBLEM):
                keys, _, text = text.removeprefix(KEY_PROBLEM).partition(":")
                problems.extend(f"{source}: {where}.{key}: {text}" for key in keys.split(","))
                continue
            problems.append(f"{source}: {where}: {text}")
        for where, text in _blocked_checks(data, reported):
            problems.append(f"{source}: {where}: {text}")
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but do not all take effect: one line each, naming the winner."""
    warnings = []
    for name, connector in config.connectors.items():
        where = f"{config.source}: connectors.{name}"
        if connector.domain and connector.base_url:
            warnings.append(
                f"{where}: both domain and base_url are set: base_url wins "
                f"({connector.base_url}); domain is ignored"
            )
        if isinstance(connector, IfsApps10Config) and connector.realm and connector.token_url:
            warnings.append(
                f"{where}: both realm and token_url are set: token_url wins "
                f"({connector.token_url}); realm is ignored"
            )
    return warnings


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Config:
    """Read, resolve and validate the YAML config at ``path``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{source}: {where}{problem}"]) from None
    return parse_config(data, source, overrides=overrides)
