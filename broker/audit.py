"""What the access log says an app did: the ERP operation and which credential it used.

For OData (IFS Apps 10 projections) the operation is the entity set, singleton, function or
action after the ``.svc`` segment, followed by any navigation or bound-action segments, and
the key is what stood in parentheses after the first of them (``CustomerInfoSet`` and
``CustomerId='10%2F7'``). Everything else — PSO and ION, or an IFS path outside a projection —
is the API path without the query. Paths are taken as they came on the wire: nothing is
decoded, so a key reads as the app sent it.

The credential id is an opaque digest of the credential fingerprint (itself a digest of the
configured credentials): it tells apart the credentials in force before and after a rotation,
and holds no part of any token or secret.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, NamedTuple

#: Longest operation or key logged; a longer path is cut (and marked with "…").
MAX_FIELD = 200


class Operation(NamedTuple):
    """The ERP operation of one request; ``projection`` and ``key`` only for OData."""

    name: str
    key: str | None = None
    projection: str | None = None


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD else text[: MAX_FIELD - 1] + "…"


def _split_key(segment: str) -> tuple[str, str | None]:
    """``Name(key)`` -> (``Name``, ``key``); a segment without parentheses has no key."""
    name, paren, rest = segment.partition("(")
    if not paren:
        return segment, None
    return name, rest[:-1] if rest.endswith(")") else rest


@functools.lru_cache(maxsize=4096)
def operation_of(odata: bool, rest: str) -> Operation:
    """The operation of a request whose path after the connector's route is ``rest`` (no
    query). ``odata``: the connector speaks OData (IFS Apps 10). Cached: an app calls the
    same few paths over and over."""
    if odata:
        head, svc, tail = rest.partition(".svc/")
        if svc and tail:
            segments = [s for s in tail.split("/") if s]
            if segments:
                name, key = _split_key(segments[0])
                names = [name, *(_split_key(s)[0] for s in segments[1:])]
                projection = head.rpartition("/")[2]
                return Operation(
                    _cut("/".join(names)), None if key is None else _cut(key), projection
                )
    return Operation(_cut("/" + rest))


def add_audit_fields(line: dict[str, Any], odata: bool, rest: str, credential: str | None) -> None:
    """Put the operation, its key (OData) and the id of the credential sent, if one was, on an
    access line."""
    operation = operation_of(odata, rest)
    line["operation"] = operation.name
    if operation.key is not None:
        line["operation_key"] = operation.key
    # The projection is in the line's path already; each field costs the line a redaction.
    if credential is not None:
        line["credential_id"] = credential


def credential_id(fingerprint: str) -> str:
    """An opaque id of a credential fingerprint: 12 hex digits of a digest of it."""
    return hashlib.sha256(b"erp-broker credential id\0" + fingerprint.encode()).hexdigest()[:12]
