"""A real OTLP/HTTP trace receiver on loopback, decoding what it gets with opentelemetry-proto.

It keeps every request body as it came (to search the exported bytes) and the decoded spans;
``delay`` makes it a slow collector.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

KIND = {
    SpanProto.SPAN_KIND_SERVER: "server",
    SpanProto.SPAN_KIND_CLIENT: "client",
    SpanProto.SPAN_KIND_INTERNAL: "internal",
}


def _value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    return None if field is None else getattr(value, field)


@dataclass
class Event:
    name: str
    attributes: dict[str, Any]


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    events: list[Event]
    links: list[tuple[str, str]]
    error: bool
    service: str

    def children(self, spans: list[Span]) -> list[Span]:
        return [s for s in spans if s.parent_id == self.span_id and s.trace_id == self.trace_id]


class OtlpReceiver:
    """POST /v1/traces: ExportTraceServiceRequest in, ExportTraceServiceResponse out."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.url = ""
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def start(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        decoded: list[Span] = []
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        Span(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=KIND.get(span.kind, "other"),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            events=[
                                Event(e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in span.events
                            ],
                            links=[
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ],
                            error=span.status.code == span.status.STATUS_CODE_ERROR,
                            service=str(resource.get("service.name")),
                        )
                    )
        async with self._changed:
            self.bodies.append(body)
            self.spans.extend(decoded)
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[Span]:
        """Wait until ``predicate(spans)`` holds; return the spans."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, s.kind) for s in self.spans]
                    raise AssertionError(f"spans never matched; got {names}")
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    pass
        return self.spans

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def raw(self) -> bytes:
        return b"".join(self.bodies)
