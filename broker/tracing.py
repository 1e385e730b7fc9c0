"""OpenTelemetry traces over OTLP/HTTP: everything OpenTelemetry is here, and only here.

Imported only when the config has ``tracing`` (``pip install 'erp-broker[otel]'``); without
it, the proxy holds ``tracer = None``, and a request costs one ``is None`` test of a local at
each hook (four on a request answered at the first attempt) and nothing else.

A proxied request is one trace, continuing the app's W3C ``traceparent``::

    GET /ifs/                        server span, from the app's request to the answer
    ├── token wait                   the request waited for a credential (reason, joined)
    │   └── token request            one call to the token endpoint (grant, outcome, cause)
    ├── GET                          client span: one attempt at the ERP, whose traceparent
    │                                the ERP receives
    └── GET                          the replay after a 401 (``http.request.resend_count``)

with span events on the server span for a replay after a 401 (``erp_broker.replay``) and for
each wait before a retry after a 429 or 504 (``erp_broker.retry_wait``, with its length).

Spans go out through a BatchSpanProcessor with a bounded queue: ending a span only appends to
that queue, the export runs on its own thread, and a span that finds the queue full, or a
batch the collector did not take, is counted in ``erp_broker_trace_spans_dropped_total``. No
attribute ever holds a secret: tokens, passwords, query strings and error messages are never
put on a span (``docs/operations.md``, "Tracing").
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from .config import TracingConfig, mask_url_password

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from .audit import Operation
    from .server import Request
    from .upstream import Connector

#: Spans that may wait for export; past this they are dropped (and counted), never waited for.
MAX_QUEUE = 4096
MAX_BATCH = 512
#: How often the export thread sends what has queued up.
SCHEDULE_DELAY_MS = 2000
#: Longest one export to the collector may take (on the export thread, never a request's).
EXPORT_TIMEOUT = 5.0
#: Longest the broker waits for the last spans to go out when it stops.
SHUTDOWN_WAIT = 3.0
TRACES_PATH = "/v1/traces"

_PROPAGATOR = TraceContextTextMapPropagator()
#: The exporter logs every failed try; the broker logs when exports start and stop failing.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http"

log = structlog.get_logger("broker.tracing")


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``http://collector:4318``)."""
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class _Pending:
    """Spans handed to the batch processor and not yet taken by an export (thread-safe)."""

    def __init__(self, limit: int, dropped: Counter) -> None:
        self.limit = limit
        self.dropped = dropped
        self._count = 0
        self._lock = threading.Lock()

    def admit(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                admitted = False
            else:
                self._count += 1
                admitted = True
        if not admitted:
            self.dropped.inc()
        return admitted

    def taken(self, n: int) -> None:
        with self._lock:
            self._count = max(0, self._count - n)


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of every batch the collector did not take."""

    def __init__(self, inner: SpanExporter, pending: _Pending, endpoint: str) -> None:
        self._inner = inner
        self._pending = pending
        self._endpoint = mask_url_password(endpoint)
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._pending.taken(len(spans))
        try:
            result = self._inner.export(spans)
        except Exception:  # a collector's failure is never the broker's
            result = SpanExportResult.FAILURE
        failed = result is not SpanExportResult.SUCCESS
        if failed:
            self._pending.dropped.inc(len(spans))
        if failed != self._failing:  # logged once per change, not once per batch
            self._failing = failed
            if failed:
                log.warning(
                    "trace_export_failing",
                    endpoint=self._endpoint,
                    message="the collector does not take spans; they are dropped and counted "
                    "in erp_broker_trace_spans_dropped_total",
                )
            else:
                log.info("trace_export_recovered", endpoint=self._endpoint)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """A BatchSpanProcessor whose queue never overflows unseen: a span that would not fit is
    dropped here, and counted."""

    def __init__(self, inner: BatchSpanProcessor, pending: _Pending) -> None:
        self._inner = inner
        self._pending = pending

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled and self._pending.admit():
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self._inner.force_flush(timeout_millis))


def _error_type(exc: BaseException) -> str:
    """What failed, as a bounded name: a broker error's code or kind, else the class name."""
    for attribute in ("code", "kind"):
        value = getattr(exc, attribute, None)
        if isinstance(value, str) and value != "error":
            return value
    return type(exc).__name__


class _TokenSpan:
    """A token wait's or token request's span (:class:`broker.types.TokenSpan`)."""

    __slots__ = ("context", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.context = contextvars.copy_context()
        self.context.run(otel_context.attach, trace.set_span_in_context(span))

    def set(self, key: str, value: str | bool) -> None:
        self.span.set_attribute(key, value)


class Tracing:
    """The broker's tracer provider, its export pipeline and the spans it makes."""

    def __init__(self, config: TracingConfig, dropped: Counter) -> None:
        self.config = config
        self.endpoint = traces_url(config.otlp_endpoint)
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        pending = _Pending(MAX_QUEUE, dropped)
        exporter = _CountingExporter(
            OTLPSpanExporter(endpoint=self.endpoint, timeout=EXPORT_TIMEOUT), pending, self.endpoint
        )
        logging.getLogger(_EXPORTER_LOGGER).setLevel(logging.CRITICAL)
        batch = BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            schedule_delay_millis=SCHEDULE_DELAY_MS,
            max_export_batch_size=MAX_BATCH,
            export_timeout_millis=EXPORT_TIMEOUT * 1000,
        )
        self.provider.add_span_processor(_BoundedProcessor(batch, pending))
        self.tracer = self.provider.get_tracer("erp-broker")
        #: The token request in flight per connector: a wait that joins it links to it.
        self._flights: dict[str, SpanContext] = {}

    # -- the proxy's spans ---------------------------------------------------------------------

    def request(self, request: Request, request_id: str) -> RequestTrace:
        """Start the server span of one proxied request, continuing the app's traceparent."""
        parent = _PROPAGATOR.extract(request.headers)
        span = self.tracer.start_span(
            request.method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.raw_path.partition("?")[0],
                "url.scheme": "http",
                "erp_broker.request_id": request_id,
            },
        )
        return RequestTrace(self.tracer, span, request.method)

    # -- the token manager's spans (broker.types.TokenTracer) ------------------------------------

    @contextmanager
    def token_wait(self, connector: str, reason: str, *, joined: bool) -> Iterator[_TokenSpan]:
        flight = self._flights.get(connector) if joined else None
        with self._span(
            "token wait",
            {
                "erp_broker.connector": connector,
                "erp_broker.token.reason": reason,
                "erp_broker.token.joined": joined,
            },
            links=None if flight is None else [Link(flight)],
        ) as span:
            yield span

    @contextmanager
    def token_request(self, connector: str, grant: str) -> Iterator[_TokenSpan]:
        with self._span(
            "token request",
            {"erp_broker.connector": connector, "erp_broker.token.grant": grant},
            outcome=True,
        ) as span:
            self._flights[connector] = span.span.get_span_context()
            try:
                yield span
            finally:
                self._flights.pop(connector, None)

    @contextmanager
    def _span(
        self,
        name: str,
        attributes: Mapping[str, str | bool],
        *,
        outcome: bool = False,
        links: list[Link] | None = None,
    ) -> Iterator[_TokenSpan]:
        # No exception is recorded: its message is the broker's, but its traceback's locals
        # are not ours to vouch for. The cause is a bounded name.
        span = self.tracer.start_span(name, attributes=attributes, links=links)
        try:
            yield _TokenSpan(span)
        except BaseException as exc:
            cause = _error_type(exc)
            span.set_attribute("error.type", cause)
            if outcome:
                span.set_attribute("erp_broker.token.outcome", "failure")
                span.set_attribute("erp_broker.token.cause", cause)
            span.set_status(Status(StatusCode.ERROR))
            raise
        else:
            if outcome:
                span.set_attribute("erp_broker.token.outcome", "success")
        finally:
            span.end()

    # -- lifecycle -----------------------------------------------------------------------------

    def attach(self, connectors: Mapping[str, Connector]) -> None:
        """Give every connector's token manager its spans."""
        for connector in connectors.values():
            connector.tokens.tracer = self

    def close(self) -> threading.Thread:
        """Flush and stop the export, on a daemon thread: a dead collector delays no exit.
        The caller may join the thread for a while (the last spans go out)."""
        thread = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        thread.start()
        return thread


class RequestTrace:
    """The spans of one proxied request: the server span and its attempts."""

    __slots__ = ("_attempt", "_context", "_detach", "_method", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, span: trace.Span, method: str) -> None:
        self._tracer = tracer
        self._method = method
        self.span = span
        self._context = trace.set_span_in_context(span)
        # Current while the request is handled: a token wait started for it is its child.
        self._detach = otel_context.attach(self._context)
        self._attempt: trace.Span | None = None

    def routed(self, connector: Connector, operation: Operation) -> None:
        span = self.span
        span.update_name(f"{self._method} {connector.route}")
        attributes = {
            "http.route": connector.route,
            "erp_broker.connector": connector.name,
            "erp_broker.operation": operation.name,
        }
        if operation.key is not None:
            attributes["erp_broker.operation_key"] = operation.key
        if operation.projection:
            attributes["erp_broker.projection"] = operation.projection
        span.set_attributes(attributes)

    def attempt(
        self, connector: Connector, method: str, target: str, headers: CIMultiDict[str], n: int
    ) -> None:
        """Start the client span of attempt ``n`` (from 1); its traceparent goes to the ERP."""
        self._end_attempt(None)
        # The connector and credential id are the server span's: not repeated per attempt.
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "server.address": connector.host,
            "server.port": connector.port,
            "url.path": target.partition("?")[0],
        }
        if n > 1:
            attributes["http.request.resend_count"] = n - 1
        span = self._tracer.start_span(
            method, context=self._context, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._attempt = span
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))

    def answered(self, status: int) -> None:
        """The ERP's answer head arrived: the attempt span ends with its status."""
        self._end_attempt(status)

    def _end_attempt(self, status: int | None, error: str | None = None) -> None:
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        else:
            span.set_attribute("error.type", error or "no_answer")
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def replay(self, status: int) -> None:
        """The ERP refused the credential: the request goes again with a new one."""
        self.span.add_event(
            "erp_broker.replay",
            {"erp_broker.retry.reason": "auth", "http.response.status_code": status},
        )

    def retry_wait(self, reason: str, status: int, seconds: float) -> None:
        """The request waits ``seconds`` before it goes again (429, 504)."""
        self.span.add_event(
            "erp_broker.retry_wait",
            {
                "erp_broker.retry.reason": reason,
                "http.response.status_code": status,
                "erp_broker.wait_seconds": round(seconds, 3),
            },
        )

    def finish(
        self, status: int, attempts: int, error: str | None, credential_id: str | None
    ) -> None:
        """End the server span (and an attempt the ERP never answered)."""
        self._end_attempt(None, error)
        span = self.span
        attributes: dict[str, Any] = {
            "http.response.status_code": status,
            "erp_broker.attempts": attempts,
        }
        if credential_id is not None and attempts:
            attributes["erp_broker.credential_id"] = credential_id
        if error is not None:
            attributes["error.type"] = error
        span.set_attributes(attributes)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        otel_context.detach(self._detach)
