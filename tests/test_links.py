"""Links never lead around the broker: a real broker between an app and a real (or raw) ERP."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from yarl import URL

from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector
from .procs import BrokerProcess

SVC = "main/ifsapplications/projection/v1/CustomerHandling.svc"
MiB = 1024 * 1024


@pytest.fixture
async def broker(ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory) -> BrokerServer:
    return await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})


def url(server: BrokerServer, path: str) -> URL:
    return URL(f"{server.proxy_url}/ifs/{path}", encoded=True)


class TestThroughTheBroker:
    async def test_app_pages_through_next_links(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """A client following @odata.nextLink pages through the set via the broker, and the
        ERP saw the broker's credential on every page."""
        ifs_sim.page_size = 1
        link: str | None = f"{broker.proxy_url}/ifs/{SVC}/CustomerInfoSet?$select=CustomerId"
        seen = []
        before = len(ifs_sim.api_requests)
        while link is not None:
            assert link.startswith(f"{broker.proxy_url}/ifs/{SVC}/")
            async with http.get(URL(link, encoded=True)) as response:
                assert response.status == 200
                body = orjson.loads(await response.read())
            assert body["@odata.context"].startswith(f"{broker.proxy_url}/ifs/{SVC}/$metadata")
            seen += [row["CustomerId"] for row in body["value"]]
            link = body.get("@odata.nextLink")
        assert seen == ["10/7", "ACME", "1000"]
        pages = ifs_sim.api_requests[before:]
        assert len(pages) == 3
        assert all(
            r.credential and ifs_sim.live_token(r.credential, frozenset({"access"})) for r in pages
        )
        assert [r.raw_path.rpartition("?")[2] for r in pages] == [
            "$select=CustomerId",
            "$select=CustomerId&$skiptoken=1",
            "$select=CustomerId&$skiptoken=2",
        ]

    async def test_links_use_the_host_the_app_used(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """The broker's URL is built from the app's Host: a Service name, a pod IP, anything."""
        for host in ("erp-broker.apps.svc:8080", "10.42.0.7:8080"):
            headers = {"Host": host, "Prefer": "odata.maxpagesize=2"}
            async with http.get(url(broker, f"{SVC}/CustomerInfoSet"), headers=headers) as resp:
                body = orjson.loads(await resp.read())
            assert body["@odata.nextLink"] == (
                f"http://{host}/ifs/{SVC}/CustomerInfoSet?$skiptoken=2"
            )

    async def test_location_after_create_leads_back_through_the_broker(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """Location of a created entity is the broker's URL; following it reads the entity."""
        target = url(broker, f"{SVC}/CustomerInfoSet")
        async with http.post(target, json={"CustomerId": "N/1", "Name": "New"}) as response:
            assert response.status == 201
            location = response.headers["Location"]
            created = orjson.loads(await response.read())
        assert location == f"{target}(CustomerId='N%2F1')"
        assert created["@odata.context"].startswith(f"{broker.proxy_url}/ifs/")
        async with http.get(URL(location, encoded=True)) as response:
            assert response.status == 200
            assert orjson.loads(await response.read())["Name"] == "New"
        assert ifs_sim.api_requests[-1].credential is not None

    async def test_small_answer_has_the_exact_new_length(
        self, broker: BrokerServer, http: aiohttp.ClientSession
    ) -> None:
        """A small answer, read whole, goes out with its new Content-Length, not chunked."""
        headers = {"Accept": "application/json;odata.metadata=full", "Accept-Encoding": "identity"}
        async with http.get(url(broker, f"{SVC}/CustomerInfoSet"), headers=headers) as response:
            body = await response.read()
            assert int(response.headers["Content-Length"]) == len(body)
            assert "Transfer-Encoding" not in response.headers
        ids = [row["@odata.id"] for row in orjson.loads(body)["value"]]
        assert ids[0] == f"{broker.proxy_url}/ifs/{SVC}/CustomerInfoSet(CustomerId='10%2F7')"

    async def test_gzip_json_arrives_rewritten_and_uncompressed(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """The ERP's gzip JSON is inflated, rewritten and sent plain, chunked."""
        headers = {"Accept-Encoding": "gzip"}
        async with http.get(url(broker, f"{SVC}/CustomerInfoSet"), headers=headers) as response:
            assert ifs_sim.api_requests[-1].headers["Accept-Encoding"] == "gzip"
            assert "Content-Encoding" not in response.headers
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in response.headers
            body = orjson.loads(await response.read())
        assert body["@odata.context"].startswith(f"{broker.proxy_url}/ifs/")

    async def test_compressed_non_json_is_untouched(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """A gzip body that is not JSON passes byte for byte, still compressed."""
        text = f"see {ifs_sim.url}/{SVC}/x".encode()
        packed = gzip.compress(text, mtime=0)
        ifs_sim.queue_api_response(
            200, headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"}, body=packed
        )
        async with http.get(url(broker, "_test/echo/x")) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == packed

    async def test_non_json_and_other_urls_arrive_byte_for_byte(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """Text with the ERP's URL, and a Location elsewhere, are not touched."""
        text = f'{{"link": "{ifs_sim.url}/{SVC}"}}'.encode()
        ifs_sim.queue_api_response(
            302,
            headers={"Content-Type": "text/plain", "Location": "https://elsewhere.example/x"},
            body=text,
        )
        async with http.get(url(broker, "_test/echo/x"), allow_redirects=False) as response:
            assert response.headers["Location"] == "https://elsewhere.example/x"
            assert await response.read() == text

    async def test_escaped_links_in_a_queued_answer(
        self, broker: BrokerServer, ifs_sim: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """JSON's \\/ and \\u002f spellings of the ERP's URL are links too."""
        escaped = ifs_sim.url.replace("/", "\\/")
        body = (
            '{"a": "'
            + escaped
            + '\\/x", "b": "'
            + ifs_sim.url.replace("/", "\\u002f")
            + '/y", "c": "'
            + ifs_sim.url
            + 'z"}'
        )
        ifs_sim.queue_api_response(
            200, headers={"Content-Type": "application/problem+json"}, body=body.encode()
        )
        async with http.get(url(broker, "_test/echo/x")) as response:
            data = orjson.loads(await response.read())
        assert data == {
            "a": f"{broker.proxy_url}/ifs/x",
            "b": f"{broker.proxy_url}/ifs/y",
            "c": f"{ifs_sim.url}z",
        }


class TestRewriteOff:
    async def test_json_arrives_byte_for_byte(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """rewrite_links: false leaves JSON bodies as the ERP sent them (Location still
        leads through the broker)."""
        broker = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file, rewrite_links=False)})
        body = f'{{"@odata.nextLink": "{ifs_sim.url}/{SVC}/Set?$skiptoken=1"}}'.encode()
        ifs_sim.queue_api_response(
            200,
            headers={"Content-Type": "application/json", "Location": f"{ifs_sim.url}/{SVC}/X"},
            body=body,
        )
        async with http.get(url(broker, "_test/echo/x")) as response:
            assert await response.read() == body
            assert response.headers["Location"] == f"{broker.proxy_url}/ifs/{SVC}/X"


# -- a 20 MiB answer from a raw-socket ERP -------------------------------------------------------


def records(plain: str, escaped: str, erp: str, size: int) -> Iterator[bytes]:
    """A JSON collection of about ``size`` bytes whose links start with ``plain`` (or, in
    every third record, ``escaped``: the same base with ``\\/``); the ERP's URL ``erp`` also
    appears inside a string (after an escaped quote), where it is not a link."""
    yield b'{"@odata.context": "' + plain.encode() + b'/$metadata#Big", "value": ['
    for n in range(size // 160):  # about 160 bytes a record
        base = escaped if n % 3 == 0 else plain
        record = (
            f'{{"@odata.id": "{base}/Big({n})", "Text": "row {n} \\"{erp}\\" x", '
            f'"Other": "https://elsewhere.example/{n}", "Pad": "{"p" * (n % 50)}"}}'
        ).encode()
        if n:
            record = b", " + record
        yield record
    yield b'], "@odata.nextLink": "' + plain.encode() + b'/Big?$skiptoken=1"}'


class RawErp:
    """An ERP on raw sockets: a token endpoint, and ``/big`` written in writes of ``step``
    bytes for its first ``odd_bytes``, then 64 KiB at a time, close-delimited or chunked."""

    def __init__(self, size: int, step: int, odd_bytes: int) -> None:
        self.size, self.step, self.odd_bytes = size, step, odd_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.authorizations: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(65536)
                if not piece:
                    return
                head += piece
            request_line = head.split(b"\r\n", 1)[0].decode()
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"authorization:"):
                    self.authorizations.append(line.split(b":", 1)[1].strip().decode())
            if request_line.startswith("POST"):
                token = orjson.dumps(
                    {"access_token": "raw-token", "expires_in": 300, "token_type": "Bearer"}
                )
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(token), token)
                )
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json;odata.metadata="
                b"minimal\r\nConnection: close\r\n\r\n"
            )
            sent = 0
            big = request_line.split()[1].endswith("/big")
            size, odd_bytes = (self.size, self.odd_bytes) if big else (MiB, 0)
            for record in records(self.url, self.url.replace("/", "\\/"), self.url, size):
                view = memoryview(record)
                while view:
                    step = self.step if sent < odd_bytes else 65536
                    conn.sendall(view[:step])
                    sent += len(view[:step])
                    view = view[step:]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("step", [1, 7])
async def test_20_mib_streamed_in_odd_writes_arrives_rewritten(step: int, tmp_path: Path) -> None:
    """A 20 MiB JSON answer (close-delimited; its first 128 KiB written 1 or 7 bytes at a time,
    so links are split at every position) arrives rewritten byte-exactly, chunked, and the
    broker's peak memory grows far less than the body's size."""
    erp = RawErp(20 * MiB, step, 128 * 1024)
    connector = {
        "type": "ifs_apps10",
        "base_url": erp.url,
        "token_url": f"{erp.url}/token",
        "client_id": "c",
        "client_secret": "s",
        "username": "u",
        "password": "p",
    }
    config = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "access_log": False,
        "store": {"sqlite": str(tmp_path / "t.db")},
        "connectors": {"erp": connector},
    }
    proc = await BrokerProcess(config, tmp_path).start()
    try:
        assert proc.process is not None
        broker_base = f"{proc.proxy_url}/erp"
        expected = b"".join(records(broker_base, broker_base, erp.url, 20 * MiB))
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            # warm up: the first answer's allocations are not the body's
            async with http.get(f"{proc.proxy_url}/erp/warm-up") as response:
                assert response.status == 200
                async for _ in response.content.iter_any():
                    pass
            before = peak_rss(proc.process.pid)
            offset = 0
            async with asyncio.timeout(240):
                async with http.get(f"{proc.proxy_url}/erp/big") as response:
                    assert response.headers["Transfer-Encoding"] == "chunked"
                    async for piece in response.content.iter_any():
                        assert piece == expected[offset : offset + len(piece)], offset
                        offset += len(piece)
            growth = peak_rss(proc.process.pid) - before
        assert offset == len(expected)
        print(f"peak RSS growth {growth / MiB:.2f} MiB for a {offset / MiB:.1f} MiB answer")
        assert growth < 4 * MiB, growth
        assert set(erp.authorizations) == {"Bearer raw-token"}
    finally:
        proc.signal()
        await proc.wait()
        erp.close()
