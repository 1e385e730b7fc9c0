"""The request path's fast versions give what the plain ones gave (bench/RESULTS.md)."""

from __future__ import annotations

import datetime
import io
import random
import string
import uuid
from typing import Any

import orjson
import pytest
import structlog
from prometheus_client import generate_latest

from broker import logs
from broker.logs import _UtcTimestamp, configure_logging, info_line
from broker.metrics import ConnectorSeries, Metrics
from broker.proxy import has_dot_segment, new_request_id, request_headers
from broker.secrets import MASK, _Registry


@pytest.fixture
def restore_logging() -> Any:
    saved = structlog.get_config()
    direct = logs._direct
    yield
    structlog.configure(**saved)
    logs._direct = direct


class TestInfoLine:
    def test_same_line_as_structlog(self, restore_logging: None) -> None:
        """info_line writes what log.info writes, redaction included (timestamps aside)."""
        stream = io.StringIO()
        configure_logging("info", "json", stream=stream)
        log = structlog.get_logger("test")
        fields = {"path": "/x/super-secret-value", "status": 200, "token": "t", "n": None}
        from broker.secrets import register

        register("super-secret-value")
        log.info("request", **fields)
        info_line(log, "request", dict(fields))
        first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
        first.pop("timestamp"), second.pop("timestamp")
        assert first == second
        assert list(first) == list(second)
        assert first["path"] == f"/x/{MASK}" and first["token"] == MASK

    def test_falls_back_when_reconfigured(self, restore_logging: None) -> None:
        """Under capture_logs (a reconfiguration) the line goes through structlog."""
        configure_logging("info", "json", stream=io.StringIO())
        log = structlog.get_logger("test-capture")
        with structlog.testing.capture_logs() as captured:
            info_line(log, "request", {"status": 200})
        assert captured == [{"status": 200, "event": "request", "log_level": "info"}]

    def test_nothing_below_the_level(self, restore_logging: None) -> None:
        """At warning, info lines are dropped on both paths."""
        stream = io.StringIO()
        configure_logging("warning", "json", stream=stream)
        info_line(structlog.get_logger("test-level"), "request", {"status": 200})
        assert stream.getvalue() == ""


class TestTimestamp:
    @pytest.mark.parametrize(
        "nanos",
        [0, 1_700_000_000_000_000_000, 1_700_000_000_123_456_789, 1_799_999_999_999_999_999],
    )
    def test_same_text_as_isoformat(self, nanos: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """What TimeStamper(fmt="iso", utc=True) writes, fraction left out when zero."""
        monkeypatch.setattr(logs.time, "time_ns", lambda: nanos)
        seconds, rest = divmod(nanos, 10**9)
        expected = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
        expected = expected.replace(microsecond=rest // 1000)
        stamped = _UtcTimestamp()(None, "info", {})["timestamp"]
        assert stamped == expected.isoformat().replace("+00:00", "Z")


class TestScrubIndex:
    def test_indexed_scrub_matches_the_linear_one(self) -> None:
        """Past the linear limit, the index finds every secret the linear search finds."""
        rng = random.Random(7)
        alphabet = string.ascii_letters + "-_."
        secrets = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(6, 40))) for _ in range(300)
        ]
        registry = _Registry()
        for secret in secrets:
            registry.add(secret)
        assert registry._index is not None
        for _ in range(500):
            parts = [
                rng.choice(secrets) if rng.random() < 0.3 else rng.choice(string.ascii_letters) * 5
                for _ in range(5)
            ]
            text = " ".join(parts)
            linear = text
            for secret in registry._snapshot:
                if secret in linear:
                    linear = linear.replace(secret, MASK)
            assert registry.scrub(text) == linear


class TestRequestPath:
    def test_request_id_is_a_uuid4(self) -> None:
        """32 hex digits of a version-4, RFC 4122 UUID, as uuid4().hex."""
        value = new_request_id()
        parsed = uuid.UUID(hex=value)
        assert len(value) == 32 and parsed.hex == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122

    def test_dot_segments(self) -> None:
        """The fast path (no '.' and no '%') changes no answer."""
        for path, refused in [
            ("/a/b", False),
            ("/a.b/c", False),
            ("/a/./b", True),
            ("/a/%2e%2E/b", True),
            ("/a\\..\\b", True),
            ("/%252e%252e/", True),
        ]:
            assert has_dot_segment(path) is refused

    def test_connection_named_headers_dropped(self) -> None:
        """Headers named by Connection go, repeats stay, credentials never pass."""
        from multidict import CIMultiDict

        headers = CIMultiDict(
            [("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("A", "1"), ("A", "2"),
             ("Authorization", "Bearer app"), ("Accept", "*/*")]
        )
        assert list(request_headers(headers).items()) == [("A", "1"), ("A", "2"), ("Accept", "*/*")]


class TestConnectorSeries:
    def test_same_series_as_labels(self) -> None:
        """Cached children count into the contract's series; in-flight is read at scrape."""
        metrics = Metrics()
        inflight = [0]
        series = ConnectorSeries(metrics, "erp", lambda: inflight[0])
        for method in ("GET", "GET", "BREW"):
            series.count_request(method, 200)
        series.request_duration.observe(0.01)
        inflight[0] = 3
        text = generate_latest(metrics.registry).decode()
        assert 'erp_broker_requests_total{connector="erp",method="GET",status="200"} 2.0' in text
        assert 'erp_broker_requests_total{connector="erp",method="OTHER",status="200"} 1.0' in text
        assert 'erp_broker_inflight_requests{connector="erp"} 3.0' in text
        assert 'erp_broker_request_duration_seconds_count{connector="erp"} 1.0' in text
