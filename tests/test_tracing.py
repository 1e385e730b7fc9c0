"""OpenTelemetry tracing: spans exported over OTLP/HTTP to a real receiver on loopback.

The receiver (tests/otlp.py) decodes every export with opentelemetry-proto, so these tests see
exactly what a collector would: trace continuity from the app's traceparent to what the ERP
received, the span trees of a cold start and of a 401 replay, retry-wait events, and no secret
in any exported byte. A collector that is down or slow costs the proxy nothing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from yarl import URL

from broker import tracing
from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim, InforIonSim

from .conftest import BrokerFactory, ifs_connector, infor_connector, metric, offline_pso_connector
from .otlp import OtlpReceiver, Span

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = await OtlpReceiver().start()
    yield receiver
    await receiver.stop()


@pytest.fixture
async def traced(
    ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory, receiver: OtlpReceiver
) -> BrokerServer:
    """A broker in front of the IFS simulator, tracing to the receiver, holding a token."""
    server = await make_broker(
        {"ifs": ifs_connector(ifs_sim, ca_file)}, tracing=tracing_config(receiver)
    )
    await server.broker.wait_ready(10)
    return server


def tracing_config(receiver: OtlpReceiver | str) -> dict[str, Any]:
    endpoint = receiver if isinstance(receiver, str) else receiver.url
    return {"otlp_endpoint": endpoint, "service_name": "erp-broker-test"}


async def flush(server: BrokerServer) -> None:
    """Export what has ended now, rather than at the next scheduled batch."""
    assert server.broker.tracing is not None
    await asyncio.to_thread(server.broker.tracing.provider.force_flush, 10_000)


async def get(http: aiohttp.ClientSession, server: BrokerServer, path: str, **kwargs: Any) -> Any:
    async with http.get(f"{server.proxy_url}{path}", **kwargs) as resp:
        body = await resp.read()
        assert resp.status == 200, body
        return resp


def one(spans: list[Span], **where: Any) -> Span:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, (where, [(s.name, s.kind) for s in spans])
    return found[0]


def server_span_done(trace_id: str) -> Any:
    return lambda spans: any(s.kind == "server" and s.trace_id == trace_id for s in spans)


class TestTraceContinuity:
    async def test_the_erp_receives_the_attempts_traceparent_in_the_apps_trace(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        traced: BrokerServer,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """The app's trace goes on: server span (parent: the app's span) → client span (the
        attempt), and the ERP receives a traceparent naming that client span in that trace."""
        server = traced
        await get(http, server, "/ifs/_test/echo/x?$top=1", headers={"traceparent": TRACEPARENT})
        await flush(server)
        await receiver.wait_for(server_span_done(APP_TRACE))
        spans = receiver.trace(APP_TRACE)
        root = one(spans, kind="server")
        assert root.parent_id == APP_SPAN
        assert root.name == "GET /ifs/"
        assert root.service == "erp-broker-test"
        assert root.attributes["http.request.method"] == "GET"
        assert root.attributes["url.path"] == "/ifs/_test/echo/x"  # no query
        assert root.attributes["http.route"] == "/ifs/"
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["erp_broker.connector"] == "ifs"
        assert root.attributes["erp_broker.attempts"] == 1
        (attempt,) = root.children(spans)
        assert attempt.kind == "client"
        assert attempt.attributes["server.address"] == URL(ifs_sim.url).host
        assert attempt.attributes["server.port"] == URL(ifs_sim.url).port
        assert attempt.attributes["http.response.status_code"] == 200
        assert attempt.attributes["url.path"].endswith("/_test/echo/x")
        sent = ifs_sim.api_requests[-1].headers["traceparent"]
        assert sent == f"00-{APP_TRACE}-{attempt.span_id}-01"

    async def test_without_an_app_traceparent_a_trace_starts_at_the_broker(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        traced: BrokerServer,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """No traceparent from the app: the server span is a root, and the ERP still gets one."""
        server = traced
        await get(http, server, "/ifs/_test/echo/y")
        sent = ifs_sim.api_requests[-1].headers["traceparent"]
        trace_id = sent.split("-")[1]
        await flush(server)
        await receiver.wait_for(server_span_done(trace_id))
        root = one(receiver.trace(trace_id), kind="server")
        assert root.parent_id == ""

    async def test_tracing_off_forwards_the_apps_traceparent_untouched(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Without `tracing` the broker is not in the trace: the ERP gets the app's header."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        assert server.broker.proxy is not None and server.broker.proxy.tracer is None
        await server.broker.wait_ready(10)
        await get(http, server, "/ifs/_test/echo/z", headers={"traceparent": TRACEPARENT})
        assert ifs_sim.api_requests[-1].headers["traceparent"] == TRACEPARENT


class TestSpanTrees:
    async def test_cold_start(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """A request that arrives while the first login is under way: server span → token wait
        (joined, linked to the token request: password grant, success) → the attempt."""
        ifs_sim.token_delay = 1.0  # the first login is still running when the request comes
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, tracing=tracing_config(receiver)
        )
        await get(http, server, "/ifs/_test/echo/cold", headers={"traceparent": TRACEPARENT})
        await flush(server)
        await receiver.wait_for(server_span_done(APP_TRACE))
        await receiver.wait_for(lambda spans: any(s.name == "token request" for s in spans))
        spans = receiver.trace(APP_TRACE)
        root = one(spans, kind="server")
        attempt, wait = sorted(root.children(spans), key=lambda s: s.kind)
        assert (wait.name, attempt.kind) == ("token wait", "client")
        assert wait.attributes["erp_broker.connector"] == "ifs"
        assert wait.attributes["erp_broker.token.joined"] is True
        request = one(receiver.spans, name="token request")
        assert wait.links == [(request.trace_id, request.span_id)]
        assert request.attributes["erp_broker.token.grant"] == "password"
        assert request.attributes["erp_broker.token.outcome"] == "success"
        assert not request.error

    async def test_401_replay(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        traced: BrokerServer,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """The ERP refuses the token: attempt 1 (401) → replay event → token wait (rejected) →
        token request (refresh grant) → attempt 2 (200, resend count 1); each attempt's
        traceparent reached the ERP."""
        server = traced
        ifs_sim.expire_all_tokens()
        before = len(ifs_sim.api_requests)
        await get(http, server, "/ifs/_test/echo/replay", headers={"traceparent": TRACEPARENT})
        await flush(server)
        await receiver.wait_for(server_span_done(APP_TRACE))
        spans = receiver.trace(APP_TRACE)
        root = one(spans, kind="server")
        assert root.attributes["erp_broker.attempts"] == 2
        assert [e.name for e in root.events] == ["erp_broker.replay"]
        assert root.events[0].attributes == {
            "erp_broker.retry.reason": "auth",
            "http.response.status_code": 401,
        }
        children = root.children(spans)
        attempts = [s for s in children if s.kind == "client"]
        assert [a.attributes["http.response.status_code"] for a in attempts] == [401, 200]
        assert "http.request.resend_count" not in attempts[0].attributes
        assert attempts[1].attributes["http.request.resend_count"] == 1
        assert attempts[0].error and not attempts[1].error
        wait = one(children, name="token wait")
        assert wait.attributes["erp_broker.token.reason"] == "rejected"
        assert wait.attributes["erp_broker.token.joined"] is False
        (request,) = wait.children(spans)
        assert request.name == "token request"
        assert request.attributes["erp_broker.token.grant"] == "refresh_token"
        assert request.attributes["erp_broker.token.outcome"] == "success"
        received = [r.headers["traceparent"] for r in ifs_sim.api_requests[before:]]
        assert received == [f"00-{APP_TRACE}-{a.span_id}-01" for a in attempts]

    async def test_failed_token_request_carries_its_cause(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """A token request the ERP refuses ends with outcome failure and a bounded cause."""
        ifs_sim.queue_token_response(401, body={"error": "invalid_grant"}, count=5)
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)}, tracing=tracing_config(receiver)
        )
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status in (502, 503)
        await flush(server)
        spans = await receiver.wait_for(lambda spans: any(s.name == "token request" for s in spans))
        request = next(s for s in spans if s.name == "token request")
        assert request.attributes["erp_broker.token.outcome"] == "failure"
        assert request.attributes["erp_broker.token.cause"] == "credentials_rejected"
        assert request.error

    @pytest.mark.parametrize(
        ("status", "reason"), [(429, "rate_limited"), (504, "gateway_timeout")]
    )
    async def test_retry_waits_are_events_with_their_length(
        self,
        status: int,
        reason: str,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """Each wait before a retry after a 429 or 504 is an event with reason and seconds."""
        connector = ifs_connector(ifs_sim, ca_file, retry={"base_delay": 0.2, "max_wait": 1})
        server = await make_broker({"ifs": connector}, tracing=tracing_config(receiver))
        await server.broker.wait_ready(10)
        ifs_sim.queue_api_response(
            status, headers={"Retry-After": "1"} if status == 429 else None, count=2
        )
        await get(http, server, "/ifs/_test/echo/w", headers={"traceparent": TRACEPARENT})
        await flush(server)
        await receiver.wait_for(server_span_done(APP_TRACE))
        root = one(receiver.trace(APP_TRACE), kind="server")
        waits = [e for e in root.events if e.name == "erp_broker.retry_wait"]
        assert len(waits) == 2
        for event in waits:
            assert event.attributes["erp_broker.retry.reason"] == reason
            assert event.attributes["http.response.status_code"] == status
            assert 0 < event.attributes["erp_broker.wait_seconds"] <= 1
        assert root.attributes["erp_broker.attempts"] == 3

    async def test_an_erp_that_does_not_answer_ends_both_spans_in_error(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """The ERP does not answer within the timeout: the attempt span ends in error with the
        broker's code, and the server span carries the 504 and the code."""
        connector = ifs_connector(ifs_sim, ca_file, timeout=0.5)
        server = await make_broker({"ifs": connector}, tracing=tracing_config(receiver))
        await server.broker.wait_ready(10)
        async with http.get(
            f"{server.proxy_url}/ifs/_test/slow/5", headers={"traceparent": TRACEPARENT}
        ) as resp:
            assert resp.status == 504
        await flush(server)
        await receiver.wait_for(server_span_done(APP_TRACE))
        spans = receiver.trace(APP_TRACE)
        root = one(spans, kind="server")
        assert root.error
        assert root.attributes["http.response.status_code"] == 504
        assert root.attributes["error.type"] == "upstream_timeout"
        (attempt,) = root.children(spans)
        assert attempt.error and attempt.attributes["error.type"] == "upstream_timeout"
        assert "http.response.status_code" not in attempt.attributes


class TestNoSecrets:
    async def test_no_secret_in_any_exported_byte(
        self,
        infor_sim: InforIonSim,
        ca_file: str,
        make_broker: BrokerFactory,
        receiver: OtlpReceiver,
        http: aiohttp.ClientSession,
    ) -> None:
        """Passwords, client secrets, service-account keys, every access and refresh token,
        the app's own credentials and the query string are in no exported byte."""
        server = await make_broker(
            {"ion": infor_connector(infor_sim, ca_file)}, tracing=tracing_config(receiver)
        )
        await server.broker.wait_ready(10)
        infor_sim.expire_all_tokens()  # a refresh grant too
        for _ in range(2):
            async with http.get(
                f"{server.proxy_url}/ion/_test/echo/q?apikey=QUERYSECRET",
                headers={"Authorization": "Bearer APPSECRET", "traceparent": TRACEPARENT},
            ) as resp:
                await resp.read()
        await flush(server)
        await receiver.wait_for(lambda spans: len([s for s in spans if s.kind == "server"]) == 2)
        await receiver.wait_for(lambda spans: any(s.name == "token request" for s in spans))
        exported = receiver.raw()
        ion = infor_sim.ionapi()
        secrets = {ion["cs"], ion["saak"], ion["sask"], "QUERYSECRET", "APPSECRET"}
        secrets |= {r.credential for r in infor_sim.api_requests if r.credential}
        secrets |= {
            r.form[k]
            for r in infor_sim.token_requests
            for k in ("refresh_token", "password", "client_secret")
            if r.form.get(k)
        }
        assert len(secrets) > 6
        for secret in secrets:
            assert secret.encode() not in exported, "a secret was exported"
        assert b"eyJ" not in exported  # no JWT-shaped token, nor any part of one


class TestCollectorTrouble:
    async def test_a_dead_collector_costs_requests_nothing_and_drops_are_counted(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        unused_tcp_port: int,
    ) -> None:
        """Nothing listens at otlp_endpoint: every request succeeds promptly, the spans that
        could not be delivered are counted, and the log says so once, not once per batch."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file)},
            tracing=tracing_config(f"http://127.0.0.1:{unused_tcp_port}"),
        )
        await server.broker.wait_ready(10)
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                for _ in range(30):
                    started = time.monotonic()
                    await get(http, server, "/ifs/_test/echo/dead")
                    assert time.monotonic() - started < 2.0
                await flush(server)
            deadline = time.monotonic() + 30
            while (
                metric(server, "erp_broker_trace_spans_dropped_total") < 60
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
        assert metric(server, "erp_broker_trace_spans_dropped_total") >= 60
        failing = [line for line in logs if line["event"] == "trace_export_failing"]
        assert len(failing) == 1
        assert failing[0]["endpoint"] == f"http://127.0.0.1:{unused_tcp_port}/v1/traces"

    async def test_a_slow_collector_never_blocks_a_request_and_a_full_queue_drops(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A collector that takes 30 s to answer: the export thread is stuck, the queue fills
        (made small here), spans beyond it are dropped and counted, and requests go on."""
        slow = await OtlpReceiver(delay=30).start()
        monkeypatch.setattr(tracing, "MAX_QUEUE", 8)
        monkeypatch.setattr(tracing, "MAX_BATCH", 4)
        try:
            server = await make_broker(
                {"ifs": ifs_connector(ifs_sim, ca_file)}, tracing=tracing_config(slow)
            )
            await server.broker.wait_ready(10)
            for _ in range(40):
                started = time.monotonic()
                await get(http, server, "/ifs/_test/echo/slow")
                assert time.monotonic() - started < 2.0
            assert metric(server, "erp_broker_trace_spans_dropped_total") >= 40 - 8 - 4 * 2
            started = time.monotonic()
            await server.stop()  # the stuck export delays the stop by SHUTDOWN_WAIT at most
            assert time.monotonic() - started < tracing.SHUTDOWN_WAIT + 5
        finally:
            await slow.stop()


class TestConfig:
    def test_without_the_extra_tracing_is_a_config_error_that_says_how_to_install(
        self, tmp_path: Path
    ) -> None:
        """`tracing` with OpenTelemetry not installed: exit 2, one line naming file and key,
        saying `pip install 'erp-broker[otel]'`."""
        config = tmp_path / "broker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "tracing": {"otlp_endpoint": "http://127.0.0.1:4318"},
                    "connectors": {"ifs": offline_pso_connector()},
                }
            )
        )
        # opentelemetry made unimportable, as on an install without the extra
        code = (
            "import sys; sys.modules['opentelemetry'] = None; "
            "from broker.cli import main; sys.exit(main(['check', '-c', sys.argv[1]]))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stdout + result.stderr
        line = f"{config}: tracing: tracing needs OpenTelemetry, which is not installed: pip install 'erp-broker[otel]'"
        assert line in result.stderr

    def test_without_tracing_opentelemetry_is_never_imported(self) -> None:
        """No `tracing`: the broker, its proxy and CLI never import OpenTelemetry."""
        code = (
            "import sys, broker.app, broker.proxy, broker.cli, broker.tokens; "
            "sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize(
        ("tracing_value", "problem"),
        [
            (
                {"otlp_endpoint": "collector:4318"},
                "tracing.otlp_endpoint: otlp_endpoint must be an http(s) URL",
            ),
            ({"otlp_endpoint": "http://c:4318", "sample_ratio": 2}, "tracing.sample_ratio:"),
            ({"otlp_endpoint": "http://c:4318", "extra": 1}, "tracing.extra: unknown key"),
        ],
    )
    def test_bad_tracing_settings_are_named(
        self, tracing_value: dict[str, Any], problem: str
    ) -> None:
        from broker.config import parse_config
        from broker.errors import ConfigError

        with pytest.raises(ConfigError) as info:
            parse_config(
                {
                    "tracing": tracing_value,
                    "connectors": {"p": offline_pso_connector()},
                },
                "b.yaml",
            )
        assert any(problem in line for line in info.value.problems), info.value.problems

    def test_endpoint_gets_the_traces_path(self) -> None:
        assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
        assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"

    def test_a_password_in_the_endpoint_is_masked_when_the_config_is_printed(self) -> None:
        from broker.config import parse_config

        config = parse_config(
            {
                "tracing": {"otlp_endpoint": "https://user:hunter2@collector:4318"},
                "connectors": {"p": offline_pso_connector()},
            }
        )
        printed = str(config.redacted())
        assert "hunter2" not in printed and "collector:4318" in printed
