"""What tracing and the audit fields cost one request, in CPU, measured in-process.

    python -m bench.tracing_cost [--rounds 15] [--n 20000]

On a shared 2-core VM a wrk run moves by 2-3x from minute to minute, far more than the 2 %
being checked, so the per-request work the change added is also timed on its own, interleaved
round by round, best round kept (the least disturbed by other processes):

* ``access line, before``: the access-log line as the proxy wrote it before issue 17, through
  the broker's own JSON logging pipeline (configure_logging, info_line) to /dev/null;
* ``access line, after``: the same with what the proxy does now when tracing is off: the
  ``tracer is None`` tests and the audit fields (operation, key, credential id);
* ``spans of one request``: with ``tracing`` on, everything one proxied request adds: extract
  the app's traceparent, the server span, one attempt's client span with its traceparent
  injected, their attributes, and both spans ended into the batch processor (exported on its
  own thread to a port where nothing listens; dropped spans are counted, as in production).

Compare the differences with the broker's CPU per request in bench/RESULTS.md (µs/req).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter

from broker.audit import add_audit_fields, operation_of
from broker.config import TracingConfig
from broker.logs import configure_logging, info_line

ODATA = (
    "main/ifsapplications/projection/v1/CustomerHandling.svc/CustomerInfoSet(CustomerId='10%2F7')"
)
log = structlog.get_logger("broker.proxy")


class _Request:
    method = "GET"
    raw_path = f"/ifs/{ODATA}?$select=Name"
    path = f"/ifs/{ODATA}"
    headers = CIMultiDictProxy(
        CIMultiDict({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    )


class _Connector:
    name = "ifs"
    route = "/ifs/"
    host = "erp.example.com"
    port = 443
    odata = True
    credential_id = "da6f2f5d4d00"


def _line(connector: Any, request: Any) -> dict[str, Any]:
    """The access line's fields as the proxy wrote them before issue 17."""
    return {
        "connector": connector.name if connector else None,
        "method": request.method,
        "path": request.path,
        "status": 200,
        "duration_ms": 12.34,
        "attempts": 1,
        "request_id": "03b6ad5c45394f4a8baa7e4db0f9d651",
    }


def _before(request: Any, connector: Any, rest: str) -> None:
    info_line(log, "request", _line(connector, request))


def _after(request: Any, connector: Any, rest: str, tracer: Any = None) -> None:
    # What Proxy.handle added when tracing is off: three `trace is not None` tests ...
    trace = None if tracer is None else tracer
    for _ in range(3):
        if trace is not None:
            raise AssertionError
    line = _line(connector, request)
    # ... and the audit fields.
    if connector is not None:
        add_audit_fields(line, connector.odata, rest, connector.credential_id)
    info_line(log, "request", line)


def _spans(tracing: Any) -> Callable[[Any, Any, str], None]:
    def one(request: Any, connector: Any, rest: str) -> None:
        trace = tracing.request(request, "03b6ad5c45394f4a8baa7e4db0f9d651")
        trace.routed(connector, operation_of(True, rest))
        headers: CIMultiDict[str] = CIMultiDict()
        trace.attempt(connector, "GET", "/" + rest, headers, 1)
        trace.answered(200)
        trace.finish(200, 1, None, connector.credential_id)

    return one


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    with open("/dev/null", "w") as devnull:
        configure_logging("info", "json", stream=devnull)
        from broker.tracing import Tracing

        registry = CollectorRegistry()
        dropped = Counter("dropped", "spans dropped", registry=registry)
        tracing = Tracing(TracingConfig(otlp_endpoint="http://127.0.0.1:9"), dropped)
        cases: dict[str, Callable[[Any, Any, str], None]] = {
            "access line, before": _before,
            "access line, after (tracing off)": _after,
            "spans of one request (tracing on)": _spans(tracing),
        }
        request, connector, rest = _Request(), _Connector(), ODATA
        best = {name: float("inf") for name in cases}
        for _ in range(args.rounds):
            for name, case in cases.items():
                started = time.process_time()
                for _ in range(args.n):
                    case(request, connector, rest)
                best[name] = min(best[name], (time.process_time() - started) / args.n * 1e6)
        tracing.close().join(1)
    for name, micros in best.items():
        print(f"{name:40} {micros:7.2f} µs CPU per request (best of {args.rounds} rounds)")
    added = best["access line, after (tracing off)"] - best["access line, before"]
    print(f"{'added with tracing off':40} {added:7.2f} µs")
    dropped_total = registry.get_sample_value("dropped_total") or 0
    print(f"{'spans dropped (nothing listens)':40} {dropped_total:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
