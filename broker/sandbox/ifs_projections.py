"""Canned IFS projections for the IFS Applications 10 simulator, and the documents about them.

One description of each projection (entity sets, keys, typed properties, sample rows) feeds the
entity data, the projection list, ``$metadata`` (EDMX) and ``$openapi`` (OpenAPI 3.0.1 or
Swagger 2.0), so they cannot disagree.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

JSON = dict[str, Any]

#: Edm type -> (JSON-schema type, format)
_SCHEMA_TYPES: dict[str, tuple[str, str | None]] = {
    "Edm.String": ("string", None),
    "Edm.Int32": ("integer", "int32"),
    "Edm.Decimal": ("number", "decimal"),
    "Edm.Date": ("string", "date"),
    "Edm.Boolean": ("boolean", None),
}


@dataclass(frozen=True, slots=True)
class EntitySet:
    name: str
    entity_type: str
    keys: tuple[str, ...]
    properties: tuple[tuple[str, str], ...]  # (name, Edm type), keys first
    rows: tuple[JSON, ...]

    def key_of(self, row: JSON) -> tuple[str, ...]:
        return tuple(str(row[k]) for k in self.keys)

    def key_template(self) -> str:
        """The key predicate of the OpenAPI path template, e.g. ``CustomerId='{CustomerId}'``."""
        quote = {k: "'" if self.edm_type(k) == "Edm.String" else "" for k in self.keys}
        return ",".join(f"{k}={quote[k]}{{{k}}}{quote[k]}" for k in self.keys)

    def edm_type(self, prop: str) -> str:
        return dict(self.properties)[prop]


@dataclass(frozen=True, slots=True)
class Projection:
    name: str
    description: str
    entity_sets: tuple[EntitySet, ...]

    def entity_set(self, name: str) -> EntitySet | None:
        return next((s for s in self.entity_sets if s.name == name), None)


PROJECTIONS: tuple[Projection, ...] = (
    Projection(
        "CustomerHandling",
        "Customer information: general data, addresses and contacts",
        (
            EntitySet(
                "CustomerInfoSet",
                "CustomerInfo",
                ("CustomerId",),
                (
                    ("CustomerId", "Edm.String"),
                    ("Name", "Edm.String"),
                    ("Country", "Edm.String"),
                    ("CreationDate", "Edm.Date"),
                    ("Objstate", "Edm.String"),
                ),
                (
                    {
                        "CustomerId": "10/7",
                        "Name": "Nordic Tools AB",
                        "Country": "SE",
                        "CreationDate": "2019-03-14",
                        "Objstate": "Active",
                    },
                    {
                        "CustomerId": "ACME",
                        "Name": "ACME Corporation",
                        "Country": "US",
                        "CreationDate": "2017-11-02",
                        "Objstate": "Active",
                    },
                    {
                        "CustomerId": "1000",
                        "Name": "a b Trading Ltd",
                        "Country": "GB",
                        "CreationDate": "2021-06-30",
                        "Objstate": "Blocked",
                    },
                ),
            ),
        ),
    ),
    Projection(
        "PurchaseOrderHandling",
        "Purchase orders and their lines",
        (
            EntitySet(
                "PurchaseOrderSet",
                "PurchaseOrder",
                ("OrderNo",),
                (
                    ("OrderNo", "Edm.String"),
                    ("Contract", "Edm.String"),
                    ("VendorNo", "Edm.String"),
                    ("OrderDate", "Edm.Date"),
                    ("Objstate", "Edm.String"),
                ),
                (
                    {
                        "OrderNo": "P1001",
                        "Contract": "1",
                        "VendorNo": "V100",
                        "OrderDate": "2024-01-15",
                        "Objstate": "Released",
                    },
                    {
                        "OrderNo": "P1002",
                        "Contract": "1",
                        "VendorNo": "V200",
                        "OrderDate": "2024-02-01",
                        "Objstate": "Planned",
                    },
                ),
            ),
        ),
    ),
    Projection(
        "WorkOrderHandling",
        "Separate work orders: prepare, release and report",
        (
            EntitySet(
                "ActiveSeparateSet",
                "ActiveSeparate",
                ("WoNo",),
                (
                    ("WoNo", "Edm.Int32"),
                    ("Contract", "Edm.String"),
                    ("ErrDescr", "Edm.String"),
                    ("PlanHrs", "Edm.Decimal"),
                    ("Objstate", "Edm.String"),
                ),
                (
                    {
                        "WoNo": 1001,
                        "Contract": "1",
                        "ErrDescr": "Pump leaking",
                        "PlanHrs": 2.5,
                        "Objstate": "Released",
                    },
                    {
                        "WoNo": 1002,
                        "Contract": "1",
                        "ErrDescr": "Replace filter",
                        "PlanHrs": 1.0,
                        "Objstate": "WorkStarted",
                    },
                ),
            ),
        ),
    ),
)

BY_NAME = {p.name: p for p in PROJECTIONS}


def parse_key(predicate: str) -> dict[str, str] | None:
    """``CustomerId='10%2F7'`` (or ``'10%2F7'``, or ``A='x',B=2``) -> {name or "": value}.

    Percent-decoding comes first, so a quote-aware split still sees encoded commas as data.
    """
    text = urllib.parse.unquote(predicate)
    parts: list[str] = []
    current, quoted = "", False
    for char in text:
        if char == "'":
            quoted = not quoted  # '' inside a literal toggles twice: stays quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    key: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep:
            name, value = "", part
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("''", "'")
        elif not value or "'" in value:
            return None
        key[name.strip()] = value
    return key


def _schema(edm_type: str) -> JSON:
    kind, fmt = _SCHEMA_TYPES[edm_type]
    return {"type": kind, "format": fmt} if fmt else {"type": kind}


def _definition(entity_set: EntitySet) -> JSON:
    return {
        "type": "object",
        "properties": {name: _schema(t) for name, t in entity_set.properties},
        "required": list(entity_set.keys),
    }


def openapi_document(projection: Projection, base_url: str, version: int = 3) -> JSON:
    """The projection's API as ``$openapi`` serves it: OpenAPI 3.0.1, or Swagger 2.0."""
    v3 = version == 3
    ref_root = "#/components/schemas/" if v3 else "#/definitions/"
    service_path = f"/main/ifsapplications/projection/v1/{projection.name}.svc"

    def body_schema(entity_set: EntitySet) -> JSON:
        return {"$ref": ref_root + entity_set.entity_type}

    def returns(status: str, description: str, schema: JSON | None) -> JSON:
        if schema is None:
            return {status: {"description": description}}
        if v3:
            content = {"application/json": {"schema": schema}}
            return {status: {"description": description, "content": content}}
        return {status: {"description": description, "schema": schema}}

    def param(name: str, where: str, schema: JSON, description: str, required: bool) -> JSON:
        spec: JSON = {"name": name, "in": where, "required": required, "description": description}
        return spec | ({"schema": schema} if v3 else schema)

    def body_param(entity_set: EntitySet) -> JSON:
        if v3:
            content = {"application/json": {"schema": body_schema(entity_set)}}
            return {"requestBody": {"required": True, "content": content}}
        spec = {"name": "body", "in": "body", "required": True, "schema": body_schema(entity_set)}
        return {"parameters": [spec]}

    query = [
        param("$top", "query", {"type": "integer"}, "Show only the first n items", False),
        param("$skip", "query", {"type": "integer"}, "Skip the first n items", False),
        param("$filter", "query", {"type": "string"}, "Filter items by property values", False),
        param("$select", "query", {"type": "string"}, "Select properties to be returned", False),
    ]
    if_match = param("If-Match", "header", {"type": "string"}, "ETag of the entity", True)
    paths: JSON = {}
    for es in projection.entity_sets:
        collection = {
            "type": "object",
            "properties": {"value": {"type": "array", "items": body_schema(es)}},
        }
        keys = [param(k, "path", _schema(es.edm_type(k)), f"Key {k}", True) for k in es.keys]
        tags = [es.name]
        paths[f"/{es.name}"] = {
            "get": {
                "summary": f"Get entities from {es.name}",
                "operationId": f"Get_{es.name}",
                "tags": tags,
                "parameters": query,
                "responses": returns("200", "Retrieved entities", collection),
            },
            "post": {
                "summary": f"Add new entity to {es.name}",
                "operationId": f"Create_{es.name}",
                "tags": tags,
                **body_param(es),
                "responses": returns("201", "Created entity", body_schema(es)),
            },
        }
        update = body_param(es)
        update_params = [*keys, if_match, *update.pop("parameters", [])]
        paths[f"/{es.name}({es.key_template()})"] = {
            "get": {
                "summary": f"Get entity from {es.name} by key",
                "operationId": f"GetByKey_{es.name}",
                "tags": tags,
                "parameters": keys,
                "responses": returns("200", "Retrieved entity", body_schema(es)),
            },
            "patch": {
                "summary": f"Update entity in {es.name}",
                "operationId": f"Update_{es.name}",
                "tags": tags,
                "parameters": update_params,
                **update,
                "responses": returns("204", "Success", None),
            },
            "delete": {
                "summary": f"Delete entity from {es.name}",
                "operationId": f"Delete_{es.name}",
                "tags": tags,
                "parameters": [*keys, if_match],
                "responses": returns("204", "Success", None),
            },
        }
    schemas = {es.entity_type: _definition(es) for es in projection.entity_sets}
    info = {"title": projection.name, "version": "1", "description": projection.description}
    if v3:
        return {
            "openapi": "3.0.1",
            "info": info,
            "servers": [{"url": base_url + service_path}],
            "paths": paths,
            "components": {"schemas": schemas},
        }
    url = urllib.parse.urlsplit(base_url)
    return {
        "swagger": "2.0",
        "info": info,
        "host": url.netloc,
        "basePath": service_path,
        "schemes": [url.scheme],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "paths": paths,
        "definitions": schemas,
    }


def metadata_xml(projection: Projection) -> str:
    """The projection's ``$metadata``: an OData v4 EDMX document."""
    namespace = f"IfsApp.{projection.name}"
    lines = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<edmx:Edmx xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx" Version="4.0">',
        "<edmx:DataServices>",
        '<Schema xmlns="http://docs.oasis-open.org/odata/ns/edm"'
        f" Namespace={quoteattr(namespace)}>",
    ]
    for es in projection.entity_sets:
        lines.append(f"<EntityType Name={quoteattr(es.entity_type)}>")
        lines.append(
            "<Key>" + "".join(f"<PropertyRef Name={quoteattr(k)}/>" for k in es.keys) + "</Key>"
        )
        for name, edm_type in es.properties:
            nullable = ' Nullable="false"' if name in es.keys else ""
            lines.append(f"<Property Name={quoteattr(name)} Type={quoteattr(edm_type)}{nullable}/>")
        lines.append("</EntityType>")
    lines.append('<EntityContainer Name="Main">')
    for es in projection.entity_sets:
        entity_type = quoteattr(f"{namespace}.{es.entity_type}")
        lines.append(f"<EntitySet Name={quoteattr(es.name)} EntityType={entity_type}/>")
    lines += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>", ""]
    return "\n".join(lines)


# -- what makes the ERP's URLs appear in answers ------------------------------------------------


def key_predicate(entity_set: EntitySet, row: JSON) -> str:
    """The key in a URL as IFS writes it: ``CustomerId='10%2F7'``, ``WoNo=1001``."""
    parts = []
    for key in entity_set.keys:
        value = str(row[key])
        if entity_set.edm_type(key) == "Edm.String":
            value = "'" + urllib.parse.quote(value.replace("'", "''"), safe="") + "'"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def max_page_size(prefer: str) -> int | None:
    """``odata.maxpagesize=n`` from a ``Prefer`` header (OData 4.0, 8.2.8.3), if any."""
    for preference in prefer.split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() == "odata.maxpagesize" and value.strip().isdigit():
            return max(1, int(value.strip()))
    return None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a collection and, when more follow, the query of the next page."""

    rows: list[JSON]
    next_query: str | None


def page_of(rows: list[JSON], query_string: str, page_size: int | None) -> Page:
    """Server-driven paging (OData 4.0, 11.2.5.7): ``$skip`` and ``$top`` pick the rows; at
    most ``page_size`` of them per answer, the next page named by an opaque ``$skiptoken``
    (here: the offset within the rows ``$skip``/``$top`` picked) added to the query as the
    client sent it. Raises ValueError naming a bad option."""
    query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
    skip = _count_option(query, "$skip") or 0
    top = _count_option(query, "$top")
    offset = _count_option(query, "$skiptoken") or 0
    chosen = rows[skip:] if top is None else rows[skip : skip + top]
    if page_size is None or offset + page_size >= len(chosen):
        return Page(chosen[offset:], None)
    kept = [
        part
        for part in query_string.split("&")
        if part and urllib.parse.unquote(part.partition("=")[0]) != "$skiptoken"
    ]
    next_query = "&".join([*kept, f"$skiptoken={offset + page_size}"])
    return Page(chosen[offset : offset + page_size], next_query)


def _count_option(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    if not values[0].isdigit():
        raise ValueError(f"Invalid {name}: {values[0]}")
    return int(values[0])
