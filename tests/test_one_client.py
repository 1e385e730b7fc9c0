"""One HTTP client per ERP (issue 13): token requests and proxied requests share the
connector's pools, TLS context and timeouts, and transport failures are mapped once.

Real simulators over loopback TLS, raw loopback servers for answers no simulator gives (bad
framing, a token endpoint that stalls mid-answer), and a real subprocess for what a running
connector imports.
"""

from __future__ import annotations

import gzip
import ssl
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme

from broker.client import CONNECT, TLS, Client, TransportError
from broker.config import parse_config
from broker.connectors import build_authenticator
from broker.direct import direct_client
from broker.errors import TokenEndpointError
from broker.probe import ProbeResult, probe
from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim

from .conftest import (
    BrokerFactory,
    ifs_connector,
    infor_connector,
    metric,
    pso_connector,
)
from .io.test_http1 import Handler, Peer, Server
from .test_footprint import modules_of_running_broker


def answering(raw: bytes, *, then_hang: bool = False) -> Handler:
    """A server answering the first request with ``raw``, byte for byte (then, with
    ``then_hang``, holding the connection open)."""

    async def handle(peer: Peer) -> None:
        if await peer.request():
            peer.send(raw)
            await peer.writer.drain()
            if then_hang:
                await peer.rest()  # until the client gives up

    return handle


@pytest.fixture
def counted_tls(tls_ca: trustme.CA) -> tuple[ssl.SSLContext, list[str]]:
    """A server context that notes every TLS handshake (the SNI callback runs once each)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    handshakes: list[str] = []

    def noted(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        handshakes.append(name or "")

    context.sni_callback = noted
    return context, handshakes


@pytest.fixture
async def counted_ifs(
    counted_tls: tuple[ssl.SSLContext, list[str]],
) -> AsyncIterator[tuple[IfsApps10Sim, list[str]]]:
    context, handshakes = counted_tls
    sim = IfsApps10Sim()
    await sim.start(ssl_context=context)
    try:
        yield sim, handshakes
    finally:
        await sim.stop()


class TestOnePoolPerOrigin:
    async def test_login_and_proxied_requests_share_one_tls_connection(
        self,
        counted_ifs: tuple[IfsApps10Sim, list[str]],
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Keycloak on the ERP's host: the login's connection carries the proxied requests
        after it. One TLS handshake for a login and five requests (two before: aiohttp's
        pool for the token, the proxy's own for the requests)."""
        sim, handshakes = counted_ifs
        server = await make_broker({"ifs": ifs_connector(sim, ca_file)})
        await server.broker.wait_ready(10)
        assert sim.count_token_requests("password") == 1
        for i in range(5):
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/{i}") as resp:
                assert resp.status == 200
                await resp.read()
        assert handshakes == ["localhost"]
        connector = server.broker.connectors["ifs"]
        assert connector.pool.open_connections == 1

    async def test_token_host_elsewhere_gets_its_pool_from_the_same_client(
        self, infor_sim: InforIonSim, ca_file: str, make_broker: BrokerFactory
    ) -> None:
        """Infor's SSO is another origin than the ION API: its own pool, from the connector's
        client, with the connector's TLS context and timeouts."""
        server = await make_broker(
            {"infor": infor_connector(infor_sim, ca_file, timeout=7, token_timeout=9)}
        )
        await server.broker.wait_ready(10)
        connector = server.broker.connectors["infor"]
        token_url = connector.config.ion.token_url()  # type: ignore[union-attr]
        token_pool = connector.client.pool(token_url)
        assert token_pool is connector.client.pool(token_url)  # one per origin
        assert token_pool.ssl_context is connector.pool.ssl_context is not None
        assert token_pool.connect_timeout == token_pool.read_timeout == 7


class TestTokenRequestsAsBefore:
    async def test_no_redirect_no_cookie_no_compression(
        self, ifs_sim: IfsApps10Sim, ca_file: str, server_ssl: ssl.SSLContext
    ) -> None:
        """A redirect is an answer, not followed; a cookie is not sent back; the broker asks
        for no compression (it inflates nothing): an IdP that gzips whenever it may still
        gives a readable token (the connector's aiohttp session asked for gzip, and did not
        inflate what came)."""
        token = orjson.dumps({"access_token": "a.b.c", "expires_in": 300, "token_type": "Bearer"})

        async def idp(peer: Peer) -> None:
            while request := await peer.request():
                if len(peer.server.requests) == 1:
                    peer.send(
                        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\n"
                        b"Set-Cookie: AUTH_SESSION_ID=abc; Path=/\r\nContent-Length: 0\r\n\r\n"
                    )
                elif b"gzip" in request.lower():
                    body = gzip.compress(token)
                    peer.send(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    )
                else:
                    peer.send(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(token) + token
                    )
                await peer.writer.drain()

        async with Server(idp, ssl_context=server_ssl) as server:
            url = f"https://localhost:{server.port}/token"
            config = parse_config(
                {"connectors": {"ifs": ifs_connector(ifs_sim, ca_file, token_url=url)}}
            ).connectors["ifs"]
            with direct_client(config) as client:
                authenticator = build_authenticator(config, client, time.time)
                with pytest.raises(TokenEndpointError, match="answered 302"):
                    await authenticator.login()
                issued = await authenticator.login()
            requests = [raw for _, raw in server.requests]
        assert issued.access == "a.b.c"
        assert len(requests) == 2  # /elsewhere never asked for
        assert all(raw.startswith(b"POST /token HTTP/1.1\r\n") for raw in requests)
        assert b"cookie" not in requests[1].lower()
        assert b"\r\naccept-encoding: identity\r\n" in requests[1].lower()


async def probe_with_idp(
    raw: bytes, sim: IfsApps10Sim, ca_file: str, server_ssl: ssl.SSLContext
) -> tuple[ProbeResult, int]:
    """A connection test whose token endpoint answers ``raw``; and that endpoint's port."""
    async with Server(answering(raw), ssl_context=server_ssl) as idp:
        url = f"https://localhost:{idp.port}/token"
        config = parse_config({"connectors": {"ifs": ifs_connector(sim, ca_file, token_url=url)}})
        return await probe("ifs", config.connectors["ifs"]), idp.port


class TestTokenTransportFailures:
    async def test_bad_framing_is_a_clear_endpoint_error(
        self, ifs_sim: IfsApps10Sim, ca_file: str, server_ssl: ssl.SSLContext
    ) -> None:
        """A token answer with both Content-Length and Transfer-Encoding: the message says the
        answer is not valid HTTP/1.1 and names the host, not "cannot reach"."""
        raw = (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n0\r\n\r\n"
        )
        result, port = await probe_with_idp(raw, ifs_sim, ca_file, server_ssl)
        assert result.ok is False and result.stage == "login"
        assert result.cause == "endpoint_error"
        assert "not valid HTTP/1.1" in result.message
        assert f"the token endpoint localhost:{port}" in result.message
        assert "Transfer-Encoding" in result.message
        assert f"login: POST https://localhost:{port}/token -> response failed" in result.steps[0]

    async def test_an_oversized_token_answer_is_refused(
        self, ifs_sim: IfsApps10Sim, ca_file: str, server_ssl: ssl.SSLContext
    ) -> None:
        """A token endpoint that sends megabytes is not read to its end."""
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + b" " * 4194304
        result, _ = await probe_with_idp(raw, ifs_sim, ca_file, server_ssl)
        assert result.cause == "endpoint_error"
        assert "larger than 1048576 bytes" in result.message

    async def test_a_token_answer_that_stalls_is_endpoint_error_within_token_timeout(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        server_ssl: ssl.SSLContext,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """The head comes, the body never ends (the read timeout is far longer): the token
        request gives up at token_timeout, counted as endpoint_error. A regression guard:
        aiohttp's session did this too."""
        raw = b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"access_token": '
        async with Server(answering(raw, then_hang=True), ssl_context=server_ssl) as idp:
            server = await make_broker(
                {
                    "ifs": ifs_connector(
                        ifs_sim,
                        ca_file,
                        token_url=f"https://localhost:{idp.port}/token",
                        token_timeout=0.5,
                        timeout=30,
                    )
                }
            )
            started = time.monotonic()
            async with http.get(f"{server.proxy_url}/ifs/_test/echo/x") as resp:
                assert resp.status == 502
                assert "0.5s" in (await resp.json())["error"]["message"]
            assert time.monotonic() - started < 5
            failures = metric(
                server, "erp_broker_login_failures_total", connector="ifs", cause="endpoint_error"
            )
            assert failures >= 1
        assert ifs_sim.api_requests == []

    async def test_refused_and_untrusted_name_the_phase(self, ifs_sim: IfsApps10Sim) -> None:
        """The one map names the phase that failed: connect (refused), TLS (an untrusted
        certificate, with the verifier's reason)."""
        client = Client(
            ssl_context=ssl.create_default_context(), limit=2, connect_timeout=5, read_timeout=5
        )
        try:
            with pytest.raises(TransportError) as untrusted:
                await client.fetch("GET", f"{ifs_sim.url}/x")
            async with Server(answering(b"")) as closed:
                port = closed.port
            with pytest.raises(TransportError) as refused:
                await client.fetch("GET", f"https://localhost:{port}/x")
        finally:
            client.close()
        assert untrusted.value.failure.phase == TLS
        assert "certificate" in untrusted.value.failure.what
        assert "check ca_file" in untrusted.value.failure.describe("the ERP")
        assert refused.value.failure.phase == CONNECT
        assert refused.value.failure.what == "connection refused"
        assert f"cannot reach the ERP localhost:{port}" in refused.value.failure.describe("the ERP")

    async def test_probe_steps_name_the_failed_phase(
        self, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """`test-connection -v` shows where a token request stopped."""
        conn = ifs_connector(ifs_sim, ca_file)
        del conn["ca_file"]
        result = await probe("ifs", parse_config({"connectors": {"ifs": conn}}).connectors["ifs"])
        assert result.steps[0].startswith("login: POST ") and "-> tls failed:" in result.steps[0]


#: What a running connector (token path and the proxy's pool) may never import.
AIOHTTP_CLIENT = ("aiohttp",)

CONNECTORS_ONLY = textwrap.dedent(
    """
    import asyncio, sys, orjson
    from multidict import CIMultiDict
    from broker.config import load_config
    from broker.coordinator import LocalCoordinator
    from broker.metrics import Metrics
    from broker.stores import open_store
    from broker.upstream import Connector

    async def run() -> None:
        config = load_config(sys.argv[1])
        metrics = Metrics()
        store = await open_store(config.store, metrics)
        coordinator = LocalCoordinator()
        connectors = [
            Connector(name, c, config.route_of(name), store, coordinator, metrics)
            for name, c in config.connectors.items()
        ]
        statuses = []
        try:
            for connector in connectors:
                await connector.start()
                token = await connector.tokens.get()
                headers = CIMultiDict()
                connector.authenticator.apply(headers, token)
                answer = await connector.pool.request(
                    "GET", connector.target_for("", ""), headers.items()
                )
                await answer.read()
                answer.release()
                statuses.append(answer.status)
        finally:
            for connector in connectors:
                await connector.close(revoke=True)
            await store.close()
        assert len(statuses) == 3, statuses
        print(orjson.dumps(sorted(sys.modules)).decode(), flush=True)

    asyncio.run(run())
    """
)


async def test_connectors_log_in_and_proxy_without_aiohttp(
    ifs_sim: IfsApps10Sim, pso_sim: PsoSim, infor_sim: InforIonSim, ca_file: str, tmp_path: Path
) -> None:
    """Issue 20: three connectors (one of each kind) log in over TLS, send through the proxy's
    pool and revoke, in a fresh interpreter: aiohttp is never imported (its client cost
    several MiB and ~0.1 s of start-up). The running broker as a whole still imports
    aiohttp.web for its admin listener until that moves onto broker/server.py; then
    tests/test_footprint.py can assert that aiohttp is absent from `erp-broker run`."""
    config: dict[str, Any] = {
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "connectors": {
            "ifs": ifs_connector(ifs_sim, ca_file),
            "pso": pso_connector(pso_sim, ca_file),
            "infor": infor_connector(infor_sim, ca_file),
        },
    }
    modules = await modules_of_running_broker(config, tmp_path, script=CONNECTORS_ONLY)
    assert "broker.upstream" in modules and "broker.connectors.infor_ion" in modules
    assert ifs_sim.count_token_requests("password") == 1  # every connector logged in,
    assert pso_sim.count_token_requests() == 1
    assert len(infor_sim.api_requests) == 1  # sent through the pool (all three: in the script),
    assert infor_sim.count_token_requests("revoke") == 1  # and revoked at close
    loaded = [m for m in modules if m.split(".")[0] in AIOHTTP_CLIENT]
    assert loaded == []
