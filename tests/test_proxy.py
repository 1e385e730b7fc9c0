"""The proxy against a real IFS Apps 10 simulator over loopback (HTTPS)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector

ODATA = "main/ifsapplications/projection/v1/CustomerHandling.svc"


async def raw_request(server: BrokerServer, data: bytes) -> bytes:
    """Send raw bytes to the proxy listener and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    await writer.wait_closed()
    return answer


async def echo(http: aiohttp.ClientSession, server: BrokerServer, path: str, **kwargs: Any) -> Any:
    async with http.request(
        kwargs.pop("method", "GET"), URL(f"{server.proxy_url}{path}", encoded=True), **kwargs
    ) as resp:
        assert resp.status == 200, await resp.text()
        return orjson.loads(await resp.read())


@pytest.fixture
async def broker(ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory) -> BrokerServer:
    return await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})


class TestCredentialInjection:
    async def test_bearer_is_injected(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """The ERP sees the broker's bearer token; the app sent none."""
        body = await echo(http, broker, "/ifs/_test/echo/x")
        issued = ifs_sim.api_requests[-1].credential
        assert issued and body["credential"] == issued
        assert ifs_sim.count_token_requests("password") == 1

    async def test_app_credentials_are_replaced_or_dropped(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Authorization, apiKey and Proxy-Authorization from the app never reach the ERP."""
        body = await echo(
            http,
            broker,
            "/ifs/_test/echo/x",
            headers={
                "Authorization": "Bearer app-token",
                "apiKey": "app-key",
                "Proxy-Authorization": "Basic eA==",
            },
        )
        names = [k.lower() for k, _ in body["headers"]]
        values = [v for _, v in body["headers"]]
        assert names.count("authorization") == 1
        assert "apikey" not in names and "proxy-authorization" not in names
        assert "Bearer app-token" not in values and "app-key" not in values

    async def test_real_odata_call(self, broker: BrokerServer, http: aiohttp.ClientSession) -> None:
        """A real projection call through the broker answers the entity."""
        async with http.get(
            URL(
                f"{broker.proxy_url}/ifs/{ODATA}/CustomerInfoSet(CustomerId='10%2F7')", encoded=True
            )
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["CustomerId"] == "10/7"


class TestFidelity:
    async def test_odata_path_and_query_arrive_byte_identical(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Keys like ('10%2F7') and $filter expressions are neither decoded nor re-encoded."""
        tail = "CustomerInfoSet(CustomerId='10%2F7')?$filter=contains(Name,%27a%20b%27)&$select=Name,CustomerId&x=%2e%41"
        body = await echo(http, broker, f"/ifs/_test/echo/{tail}")
        assert body["raw_path"] == f"/_test/echo/{tail}"

    async def test_methods_and_bodies(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Any method reaches the ERP with its body unchanged."""
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            payload = f"{method} body ü".encode()
            body = await echo(
                http,
                broker,
                "/ifs/_test/echo/m",
                method=method,
                data=payload,
                headers={"Content-Type": "application/json; odata.metadata=minimal"},
            )
            assert body["method"] == method
            assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
            assert ["Content-Type", "application/json; odata.metadata=minimal"] in body["headers"]

    async def test_gzip_passes_through_undecompressed(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Content-Encoding is untouched when links are not rewritten (rewrite_links: false): the
        app gets the ERP's gzip bytes. (With it, see tests/test_links.py.)"""
        broker = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, rewrite_links=False)})
        async with http.get(
            f"{broker.proxy_url}/ifs/_test/gzip", headers={"Accept-Encoding": "gzip"}
        ) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            raw = await resp.read()
            expected = resp.headers["X-Uncompressed-SHA256"]
        assert raw[:2] == b"\x1f\x8b"
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == expected

    async def test_repeated_response_headers_are_kept(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Two Set-Cookie headers stay two headers."""
        async with http.get(f"{broker.proxy_url}/ifs/_test/cookies") as resp:
            assert len(resp.headers.getall("Set-Cookie")) == 2

    async def test_hop_by_hop_headers_are_dropped(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """Connection, headers it names, Keep-Alive, TE and Upgrade do not reach the ERP; Host is the ERP's."""
        body = await echo(
            http,
            broker,
            "/ifs/_test/echo/h",
            headers={
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "X-Keep-Me": "yes",
            },
        )
        headers = {k.lower(): v for k, v in body["headers"]}
        for name in ("x-drop-me", "keep-alive", "te", "connection"):
            assert name not in headers
        assert headers["x-keep-me"] == "yes"
        assert headers["host"] != f"127.0.0.1:{broker.proxy_port}"

    async def test_redirects_go_back_to_the_app(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """A 302 from the ERP is returned as it came, never followed."""
        async with http.get(
            f"{broker.proxy_url}/ifs/_test/redirect", allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/elsewhere"

    async def test_large_bodies_stream_both_ways(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """8 MiB up (chunked, over the replay limit) and 8 MiB down arrive intact."""
        size = 8 * 1024 * 1024
        chunk = bytes(range(256)) * 256

        async def upload() -> Any:
            for _ in range(size // len(chunk)):
                yield chunk

        async with http.post(f"{broker.proxy_url}/ifs/_test/upload", data=upload()) as resp:
            result = await resp.json()
        assert result["length"] == size
        assert result["sha256"] == hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
        digest = hashlib.sha256()
        async with http.get(f"{broker.proxy_url}/ifs/_test/chunked/{size}") as resp:
            async for piece in resp.content.iter_chunked(65536):
                digest.update(piece)
        async with http.get(f"{broker.proxy_url}/ifs/_test/bytes/{size}") as resp:
            assert int(resp.headers["Content-Length"]) == size
            assert len(await resp.read()) == size

    async def test_request_id_is_forwarded_and_echoed(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """X-Request-ID from the app reaches the ERP and comes back; one is made when absent."""
        async with http.get(
            f"{broker.proxy_url}/ifs/_test/echo/r", headers={"X-Request-ID": "req-123"}
        ) as resp:
            body = await resp.json()
            assert resp.headers["X-Request-ID"] == "req-123"
        assert ["X-Request-ID", "req-123"] in body["headers"]
        async with http.get(f"{broker.proxy_url}/ifs/_test/echo/r") as resp:
            assert len(resp.headers["X-Request-ID"]) == 32


class TestRouting:
    async def test_longest_route_wins(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """/erp/ifs/x goes to the /erp/ifs/ connector, not /erp/."""
        token_url = f"{ifs_sim.url}/auth/realms/{ifs_sim.realm}/protocol/openid-connect/token"
        server = await make_broker(
            {
                "short": ifs_connector(
                    ifs_sim,
                    ca_file,
                    route="/erp/",
                    token_url=token_url,
                    base_url=f"{ifs_sim.url}/_test/echo/short",
                ),
                "long": ifs_connector(
                    ifs_sim,
                    ca_file,
                    route="/erp/ifs/",
                    token_url=token_url,
                    base_url=f"{ifs_sim.url}/_test/echo/long",
                ),
            }
        )
        assert (await echo(http, server, "/erp/ifs/x"))["raw_path"] == "/_test/echo/long/x"
        assert (await echo(http, server, "/erp/other"))["raw_path"] == "/_test/echo/short/other"

    async def test_unknown_route_is_a_json_404(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """No route: 404 with the broker's error body and X-Broker-Error."""
        async with http.get(f"{broker.proxy_url}/nope/x") as resp:
            assert resp.status == 404
            assert resp.headers["X-Broker-Error"] == "no_route"
            assert (await resp.json())["error"]["code"] == "no_route"

    @pytest.mark.parametrize(
        "path",
        [
            "/ifs/a/../b",
            "/ifs/./a",
            "/ifs/a/%2e%2e/b",
            "/ifs/%2E%2e/x",
            "/ifs/a/%252e%252e/b",
            "/ifs/a\\..\\b",
        ],
    )
    async def test_dot_segments_are_refused(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, path: str
    ) -> None:
        """Dot-segments, raw or percent-encoded (even twice), get 400 and never reach the ERP."""
        answer = await raw_request(
            broker, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 400")
        assert b"bad_request" in answer
        assert ifs_sim.api_requests == []

    async def test_absolute_form_is_refused(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim
    ) -> None:
        """GET http://elsewhere/ is not proxied: the broker is not an open proxy."""
        answer = await raw_request(
            broker,
            b"GET http://example.com/ifs/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400")
        assert ifs_sim.api_requests == []

    async def test_connect_is_refused(self, broker: BrokerServer) -> None:
        """CONNECT gets 400 (or the parser's refusal), never a tunnel."""
        answer = await raw_request(
            broker, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400")


class TestUpstreamErrors:
    async def test_unreachable_erp(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """An API host that refuses connections: 502 upstream_unreachable."""
        # Tokens come from the simulator; the API base points at a closed port.
        conn = ifs_connector(
            ifs_sim,
            ca_file,
            token_url=f"{ifs_sim.url}/auth/realms/{ifs_sim.realm}/protocol/openid-connect/token",
            base_url="https://127.0.0.1:9",
        )
        server = await make_broker({"ifs": conn})
        async with http.get(f"{server.proxy_url}/ifs/x") as resp:
            assert resp.status == 502
            assert resp.headers["X-Broker-Error"] == "upstream_unreachable"
            body = await resp.json()
        assert body["error"]["connector"] == "ifs"

    async def test_slow_erp_times_out(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """No answer within the connector's timeout: 504 upstream_timeout."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, timeout=0.3)})
        async with http.get(f"{server.proxy_url}/ifs/_test/slow/5") as resp:
            assert resp.status == 504
            assert resp.headers["X-Broker-Error"] == "upstream_timeout"

    async def test_tls_error_is_named(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, http: aiohttp.ClientSession
    ) -> None:
        """Without the CA, the token request fails on TLS: auth_failed says so."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, None)})  # type: ignore[arg-type]
        async with http.get(f"{server.proxy_url}/ifs/x") as resp:
            assert resp.status == 502
            assert "TLS" in (await resp.json())["error"]["message"]
