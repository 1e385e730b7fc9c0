"""IFS Applications 10 API discovery: projections, their OpenAPI documents, their operations.

The projection list comes from ``<base>/<projections_path>`` (OData ``{"value": [{"Name",
"Description"}]}``); each projection's document from ``<base>/<projection_base>/<P>.svc/$openapi``
(OpenAPI 3, or Swagger 2), fetched a few at a time with the connector's credential and cached
in the token store under ``openapi:<connector>:<projection>`` until a refresh is asked for. One
projection that fails is reported with its error; it never fails the listing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import structlog
from multidict import CIMultiDict

from .config import IfsApps10Config
from .errors import (
    DiscoveryFailed,
    ProxyError,
    RateLimited,
    TokenError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .http1 import Response as Upstream
from .types import Clock, CredentialSource, TokenStore
from .upstream import NO_BODY, Connector, reading

log = structlog.get_logger("broker.discovery")

#: Documents fetched at the same time (an IFS instance exposes thousands of projections).
DEFAULT_CONCURRENCY = 4
#: A projection's document is large, but not this large.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
CACHE_PREFIX = "openapi"


def cache_key(connector: str, projection: str) -> str:
    return f"{CACHE_PREFIX}:{connector}:{projection}"


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    summary: str
    operation_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "summary": self.summary,
            "operation_id": self.operation_id,
        }


def document_version(document: Any) -> str | None:
    """``openapi 3.0.1`` / ``swagger 2.0``, or None for something else."""
    if not isinstance(document, dict):
        return None
    for key in ("openapi", "swagger"):
        if isinstance(document.get(key), str):
            return f"{key} {document[key]}"
    return None


def parse_operations(document: Any) -> list[Operation]:
    """Every operation of an OpenAPI 3 or Swagger 2 document, in the document's order."""
    if document_version(document) is None:
        raise ValueError("not an OpenAPI 3 or Swagger 2 document")
    paths = document.get("paths")
    if not isinstance(paths, dict):
        raise ValueError("the OpenAPI document has no paths")
    operations: list[Operation] = []
    for path, item in paths.items():
        if not isinstance(item, dict):
            continue
        for method in HTTP_METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            summary = op.get("summary") or op.get("description") or ""
            summary = str(summary).strip().splitlines()[0] if str(summary).strip() else ""
            operation_id = op.get("operationId")
            operations.append(
                Operation(
                    method.upper(),
                    str(path),
                    summary,
                    operation_id if isinstance(operation_id, str) else None,
                )
            )
    return operations


@dataclass(slots=True)
class ProjectionApi:
    """One projection: where it lives, and its operations (or why they are missing)."""

    name: str
    description: str
    service_path: str
    proxy_path: str
    #: The service's URL through the broker: what an app developer pastes.
    url: str = ""
    operations: list[Operation] = field(default_factory=list)
    openapi_version: str | None = None
    fetched_at: float | None = None
    cached: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "service_path": self.service_path,
            "proxy_path": self.proxy_path,
            "url": self.url,
            "openapi_version": self.openapi_version,
            "fetched_at": self.fetched_at,
            "cached": self.cached,
            "error": self.error,
            "operations": [{**op.to_json(), "url": self.url + op.path} for op in self.operations],
        }


@dataclass(slots=True)
class DiscoveryResult:
    connector: str
    base: str
    projections: list[ProjectionApi]
    listing_error: str | None = None
    broker_url: str = ""

    @property
    def failed(self) -> list[ProjectionApi]:
        return [p for p in self.projections if p.error is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "upstream": self.base,
            "broker": self.broker_url,
            "projection_count": len(self.projections),
            "operation_count": sum(len(p.operations) for p in self.projections),
            "failed": len(self.failed),
            "listing_error": self.listing_error,
            "projections": [p.to_json() for p in self.projections],
        }


class Discovery:
    """Discovery for one ``ifs_apps10`` connector. Every request goes through the connector's
    send loop (:meth:`Connector.exchange`: its pool, its retries, counted), with the connector's
    credential (admin API) or the ``credentials`` given (command line: a fresh login)."""

    def __init__(
        self,
        connector: Connector,
        store: TokenStore | None,
        *,
        credentials: CredentialSource | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Clock = time.time,
        broker_url: str = "",
    ) -> None:
        config = connector.config
        if not isinstance(config, IfsApps10Config):
            raise TypeError(f"API discovery is for ifs_apps10 connectors, not {config.type}")
        self.name = connector.name
        self.config = config
        self.route = connector.route
        self.base = connector.base
        #: The broker's proxy URL (``http://127.0.0.1:8080``): operations are shown under it.
        self.broker_url = broker_url.rstrip("/")
        self._connector = connector
        self._credentials = credentials
        self._store = store
        self._concurrency = concurrency
        self._clock = clock

    # -- HTTP ----------------------------------------------------------------------------------

    async def _get(self, path: str) -> tuple[int, bytes]:
        """GET ``<base>/<path>`` through the send loop: the ERP's last answer and its body."""
        connector = self._connector
        target = connector.target_for(path.lstrip("/"), "")
        # identity: documents are read whole here, never decompressed.
        headers: CIMultiDict[str] = CIMultiDict(
            {"Accept": "application/json", "Accept-Encoding": "identity"}
        )
        upstream, data, attempts = await connector.exchange(
            "GET", target, headers, NO_BODY, credentials=self._credentials
        )
        with reading(upstream):
            body = data if data is not None else await self._read_limited(upstream, target)
        upstream.release()
        # Said when the send loop retried it (also counted there); a line for every document
        # would be noise: an instance has thousands.
        if attempts > 1:
            log.info(
                "discovery_retried",
                connector=self.name,
                method="GET",
                path=target,
                status=upstream.status,
                attempts=attempts,
            )
        return upstream.status, body

    async def _read_limited(self, upstream: Upstream, target: str) -> bytes:
        document = bytearray()
        async for chunk in upstream.iter_any():
            document += chunk
            if len(document) > MAX_DOCUMENT_BYTES:
                raise DiscoveryFailed(
                    f"{target}: the answer is larger than "
                    f"{MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB",
                    connector=self.name,
                )
        return bytes(document)

    async def _get_json(self, path: str, what: str) -> Any:
        try:
            status, body = await self._get(path)
        except (UpstreamTimeout, UpstreamUnreachable, RateLimited) as exc:
            # The send loop's failures to get an answer: this document's, named as such.
            raise DiscoveryFailed(f"{what}: {exc.message}", connector=self.name) from None
        if status != 200:
            raise DiscoveryFailed(
                f"{what}: the ERP answered {status}{_odata_detail(body)}", connector=self.name
            )
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise DiscoveryFailed(
                f"{what}: the ERP answered 200 without JSON", connector=self.name
            ) from None

    # -- projections ---------------------------------------------------------------------------

    def _projection(self, name: str, description: str = "") -> ProjectionApi:
        service = f"{self.config.projection_base.strip('/')}/{quote(name, safe='')}.svc"
        proxy_path = f"{self.route}{service}"
        return ProjectionApi(name, description, service, proxy_path, self.broker_url + proxy_path)

    async def list_projections(self) -> list[ProjectionApi]:
        """The projections the instance lists, sorted by name."""
        data = await self._get_json(self.config.projections_path, "the projection list")
        rows = data.get("value") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DiscoveryFailed(
                'the projection list is not an OData collection ({"value": [...]}): check '
                "projections_path",
                connector=self.name,
            )
        found: dict[str, ProjectionApi] = {}
        for row in rows:
            if not isinstance(row, dict):
                continue
            name = row.get("Name") or row.get("name") or row.get("ProjectionName")
            if isinstance(name, str) and name:
                description = row.get("Description") or row.get("description") or ""
                found[name] = self._projection(name, str(description))
        return sorted(found.values(), key=lambda p: p.name)

    async def run(self, projection: str | None = None, *, refresh: bool = False) -> DiscoveryResult:
        """List the projections (or take the one named) and fill in their operations."""
        listing_error: str | None = None
        try:
            listed = await self.list_projections()
        except ProxyError as exc:
            # A named projection may still be readable when the list is not (permissions).
            if projection is None:
                raise
            listed, listing_error = [], exc.message
        if projection is not None:
            targets = [p for p in listed if p.name == projection] or [self._projection(projection)]
        else:
            targets = listed
        limit = asyncio.Semaphore(self._concurrency)

        async def fill(target: ProjectionApi) -> None:
            async with limit:
                await self._fill(target, refresh)

        await asyncio.gather(*(fill(p) for p in targets))
        return DiscoveryResult(self.name, self.base, targets, listing_error, self.broker_url)

    async def _fill(self, target: ProjectionApi, refresh: bool) -> None:
        key = cache_key(self.name, target.name)
        if not refresh and (entry := await self._cached(key)) is not None:
            document, fetched_at = entry
            target.cached = True
        else:
            try:
                document = await self._get_json(
                    f"{target.service_path}/$openapi", f"{target.name}/$openapi"
                )
            except (DiscoveryFailed, TokenError, ProxyError) as exc:
                target.error = exc.message if isinstance(exc, ProxyError) else str(exc)
                return
            fetched_at = self._clock()
        try:
            target.operations = parse_operations(document)
        except ValueError as exc:
            target.error = f"{target.name}/$openapi: {exc}"
            return
        target.openapi_version = document_version(document)
        target.fetched_at = fetched_at
        if not target.cached:
            await self._remember(key, document, fetched_at)

    # -- cache ---------------------------------------------------------------------------------

    async def _cached(self, key: str) -> tuple[Any, float] | None:
        if self._store is None:
            return None
        try:
            raw = await self._store.get_blob(key)
            if raw is None:
                return None
            entry = orjson.loads(raw)
        except Exception as exc:  # a broken cache entry or store only costs a fetch
            log.warning("openapi_cache_read_failed", connector=self.name, error=str(exc))
            return None
        # Another instance behind the same connector name is another API.
        if not isinstance(entry, dict) or entry.get("base") != self.base:
            return None
        return entry.get("document"), float(entry.get("fetched_at") or 0.0)

    async def _remember(self, key: str, document: Any, fetched_at: float) -> None:
        if self._store is None:
            return
        entry = {"base": self.base, "fetched_at": fetched_at, "document": document}
        try:
            await self._store.put_blob(key, orjson.dumps(entry))
        except Exception as exc:
            log.warning("openapi_cache_write_failed", connector=self.name, error=str(exc))


def _odata_detail(body: bytes) -> str:
    """`` (CODE: message)`` from an OData error body, if it is one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        parts = [str(error[k]) for k in ("code", "message") if error.get(k)]
        if parts:
            return f" ({': '.join(parts)[:200]})"
    return ""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def render_table(result: DiscoveryResult) -> str:
    """A readable listing for people: one block per projection."""
    lines: list[str] = []
    for projection in result.projections:
        title = projection.name
        if projection.description:
            title += f" - {projection.description}"
        lines.append(title)
        lines.append(f"  {projection.url}")
        if projection.error is not None:
            lines.append(f"  error: {projection.error}")
            lines.append("")
            continue
        rows = [["METHOD", "URL", "SUMMARY"]] + [
            [op.method, projection.url + op.path, op.summary] for op in projection.operations
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        for row in rows:
            lines.append(
                f"  {row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}".rstrip()
            )
        lines.append("")
    operations = sum(len(p.operations) for p in result.projections)
    cached = sum(1 for p in result.projections if p.cached)
    summary = (
        f"{result.connector}: {_count(len(result.projections), 'projection')}, "
        f"{_count(operations, 'operation')} ({cached} from cache"
    )
    if result.failed:
        summary += f", {len(result.failed)} failed"
    lines.append(summary + ")")
    if result.listing_error:
        lines.append(f"warning: the projection list failed: {result.listing_error}")
    return "\n".join(lines)
