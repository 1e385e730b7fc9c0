"""The one send loop (``Connector.exchange``) as the proxy uses it: each retry it makes is
counted once in ``erp_broker_retries_total{reason}`` and in the access line's ``attempts``."""

from __future__ import annotations

import aiohttp
import pytest
import structlog
import structlog.testing

from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector, metric

REASONS = ("auth", "rate_limited", "gateway_timeout", "stale_connection", "transient")

#: The connector's auth_failure matcher the second answer below trips.
SESSION_GONE = {"status": 400, "body": "SESSION_GONE"}

#: A first answer from the ERP that the send loop retries, and the reason it is counted under
#: (status, headers, body, reason); the proxy's tests and discovery's share it.
RETRIED_FIRST_ANSWERS = [
    (401, {}, b"", "auth"),
    (400, {}, b'{"error": "SESSION_GONE"}', "auth"),  # the SESSION_GONE matcher
    (429, {"Retry-After": "0"}, b"", "rate_limited"),
    (504, {}, b"", "gateway_timeout"),
    (500, {}, b'{"error": {"code": "MI_MODIFIED_ERROR"}}', "transient"),  # retry_on
]


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason"),
    RETRIED_FIRST_ANSWERS,
)
async def test_each_retry_is_counted_and_in_the_access_line(
    ifs_sim: IfsApps10Sim,
    ca_file: str,
    make_broker: BrokerFactory,
    http: aiohttp.ClientSession,
    status: int,
    headers: dict[str, str],
    body: bytes,
    reason: str,
) -> None:
    """The ERP's first answer is retried: the app gets the second (200), the retry is counted
    once under its reason and no other, and the access line says two attempts."""
    server = await make_broker(
        {"ifs": ifs_connector(ifs_sim, ca_file, auth_failure=[SESSION_GONE])}
    )
    await server.broker.wait_ready(5)
    ifs_sim.queue_api_response(status, headers=headers, body=body)
    with structlog.testing.capture_logs() as logs:
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 200
            await resp.read()
    counted = {
        r: metric(server, "erp_broker_retries_total", connector="ifs", reason=r) for r in REASONS
    }
    assert counted == {r: (1 if r == reason else 0) for r in REASONS}
    [line] = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["attempts"]) == (200, 2)
    assert len(ifs_sim.api_requests) == 2


async def test_a_retried_request_that_fails_shows_its_attempts(
    ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory, http: aiohttp.ClientSession
) -> None:
    """A 401 replayed, then the ERP silent past ``timeout``: 504 upstream_timeout, and the
    access line still says two attempts (one retry, counted)."""
    server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, timeout=0.5)})
    await server.broker.wait_ready(5)
    ifs_sim.queue_api_response(401)
    ifs_sim.queue_api_response(200, delay=3)
    with structlog.testing.capture_logs() as logs:
        async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
            assert resp.status == 504
            assert resp.headers["X-Broker-Error"] == "upstream_timeout"
    [line] = [line for line in logs if line["event"] == "request"]
    assert (line["status"], line["attempts"]) == (504, 2)
    assert metric(server, "erp_broker_retries_total", connector="ifs", reason="auth") == 1


async def test_a_429_held_while_the_window_is_read_is_closed_when_that_fails(
    ifs_sim: IfsApps10Sim,
    ca_file: str,
    make_broker: BrokerFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The send loop holds the ERP's 429 while it asks the coordinator how long the window
    is; if that call fails (a Redis error, the request cancelled), the held connection is
    closed there and then, not left counted as busy until the ERP hangs up. A narrow unit
    case: the coordinator's call is made to fail; everything else is real."""
    server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
    await server.broker.wait_ready(5)
    connector = server.broker.connectors["ifs"]

    async def failing(key: str) -> float:
        raise RuntimeError("the coordinator failed")

    monkeypatch.setattr(connector.coordinator, "wait_window", failing)
    ifs_sim.queue_api_response(429, headers={"Retry-After": "0"})
    async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
        assert resp.status == 500
        await resp.read()
    assert connector.pool.open_connections == 0  # closed, not left busy
