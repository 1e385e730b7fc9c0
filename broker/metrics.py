"""Every Prometheus object the broker exports, defined once.

The names and labels of the first block are the product's public contract (dashboards and
alert rules depend on them). Label values are always bounded: connector names come from the
config, methods are folded to a fixed set, statuses are three-digit codes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: ERP calls take from ~10 ms to the Infor gateway's 60 s limit (5 min at most).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Token endpoints answer in ~100 ms to 2 s; the token request timeout defaults to 10 s.
TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "MERGE", "TRACE"}
)


def method_label(method: str) -> str:
    """Fold a request method into a bounded label value."""
    return method if method in KNOWN_METHODS else "OTHER"


class Metrics:
    """The broker's metric objects, on a registry of their own (one per broker instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # -- the contract -------------------------------------------------------------------
        self.requests = Counter(
            "erp_broker_requests_total",
            "Requests answered by the proxy listener.",
            ["connector", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "erp_broker_request_duration_seconds",
            "Time from receiving a request to the end of its response, retries and waits included.",
            ["connector"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "erp_broker_upstream_request_duration_seconds",
            "Time one ERP request takes until its response headers arrive.",
            ["connector"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "erp_broker_retries_total",
            "Requests sent to the ERP again, by reason.",
            ["connector", "reason"],
            registry=r,
        )
        self.token_requests = Counter(
            "erp_broker_token_requests_total",
            "Requests to the ERP's token or session endpoint.",
            ["connector", "grant", "outcome"],
            registry=r,
        )
        self.token_request_duration = Histogram(
            "erp_broker_token_request_duration_seconds",
            "Duration of one token or session request.",
            ["connector"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.token_expiry = Gauge(
            "erp_broker_token_expiry_timestamp_seconds",
            "Unix time at which the current credential expires (0 when none is held).",
            ["connector"],
            registry=r,
        )
        self.refresh_waiters = Counter(
            "erp_broker_token_refresh_waiters_total",
            "Requests that waited for a token request already in flight instead of starting one.",
            ["connector"],
            registry=r,
        )
        self.connector_up = Gauge(
            "erp_broker_connector_up",
            "1 while the connector holds a usable credential, else 0.",
            ["connector"],
            registry=r,
        )
        # -- extras for operators ------------------------------------------------------------
        self.token_last_refresh = Gauge(
            "erp_broker_token_last_refresh_timestamp_seconds",
            "Unix time of the last successful token request.",
            ["connector"],
            registry=r,
        )
        self.backoff_seconds = Counter(
            "erp_broker_backoff_seconds_total",
            "Seconds requests spent waiting before a retry, by reason.",
            ["connector", "reason"],
            registry=r,
        )
        self.login_paused = Gauge(
            "erp_broker_login_paused",
            "1 while logins are paused after the ERP rejected the configured credentials.",
            ["connector"],
            registry=r,
        )
        self.login_failures = Counter(
            "erp_broker_login_failures_total",
            "Failed token or login requests, by cause (invalid_credentials, account_disabled, "
            "account_not_set_up, client_not_allowed, invalid_client, refresh_rejected, "
            "endpoint_error).",
            ["connector", "cause"],
            registry=r,
        )
        self.login_suspended = Gauge(
            "erp_broker_login_suspended",
            "1 while logins stay paused after login_backoff.max_failures rejections in a row, "
            "until the credentials change or an operator asks for a refresh.",
            ["connector"],
            registry=r,
        )
        self.grant_idle_expiry = Gauge(
            "erp_broker_grant_idle_expiry_timestamp_seconds",
            "Unix time at which the refresh grant dies if it stays idle (last use + "
            "grant_lifetime_days); 0 when the connector holds no refresh grant.",
            ["connector"],
            registry=r,
        )
        self.inflight = Gauge(
            "erp_broker_inflight_requests",
            "Proxy requests currently being handled.",
            ["connector"],
            registry=r,
        )
        self.rate_limit_waits = Counter(
            "erp_broker_rate_limit_waits_total",
            "Requests that waited for a rate-limit window or the client-side request budget.",
            ["connector"],
            registry=r,
        )
        self.store_errors = Counter(
            "erp_broker_store_errors_total",
            "Token store operations that failed.",
            ["operation"],
            registry=r,
        )
        for operation in ("load", "save", "delete"):
            self.store_errors.labels(operation)
        self.store_up = Gauge(
            "erp_broker_store_up",
            "1 while the token store answers, else 0.",
            registry=r,
        )
        self.store_replication_unacknowledged = Counter(
            "erp_broker_store_replication_unacknowledged_total",
            "Tokens saved to a Redis primary that no replica acknowledged in time (WAIT).",
            ["connector"],
            registry=r,
        )
        self.credentials_expiry = Gauge(
            "erp_broker_credentials_expiry_timestamp_seconds",
            "Unix time at which the connector's configured credentials expire "
            "(credentials_expire; no series when it is not set).",
            ["connector"],
            registry=r,
        )
        self.spans_dropped = Counter(
            "erp_broker_trace_spans_dropped_total",
            "Trace spans not delivered to the collector: the export queue was full, or the "
            "collector failed or was too slow to take them.",
            registry=r,
        )


class ConnectorSeries:
    """One connector's labelled series on the request path, looked up once.

    ``labels()`` takes a lock and builds a key on every call; with several series touched per
    request that was a measurable share of the proxy's CPU (bench/RESULTS.md). The children
    are resolved here, once per connector (and once per method and status for the request
    counter), and the in-flight gauge reads a plain counter when scraped.
    """

    __slots__ = ("_by_status", "_name", "_requests", "request_duration", "upstream_duration")

    def __init__(self, metrics: Metrics, name: str, inflight: Callable[[], float]) -> None:
        self._name = name
        self._requests = metrics.requests
        self._by_status: dict[tuple[str, int], Counter] = {}
        self.request_duration = metrics.request_duration.labels(name)
        self.upstream_duration = metrics.upstream_duration.labels(name)
        metrics.inflight.labels(name).set_function(inflight)

    def count_request(self, method: str, status: int) -> None:
        """``erp_broker_requests_total{connector, method, status}`` += 1."""
        key = (method_label(method), status)  # bounded: folded methods, 3-digit statuses
        child = self._by_status.get(key)
        if child is None:
            child = self._by_status[key] = self._requests.labels(self._name, key[0], str(status))
        child.inc()
