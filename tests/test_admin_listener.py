"""The admin listener on the wire (issue 20): every endpoint's status, headers and body as a
raw client sees them, byte for byte where it matters, so that the listener under the admin
API can change without an operator, a probe or a scraper noticing.

Written against the aiohttp listener first (these answers are its answers); the broker's own
listener (`broker/server.py`) must give the same. What changed on purpose is tested as such: a
request the listener refuses gets the broker's JSON error, not a framework's text page.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from broker.app import BrokerServer
from broker.sandbox import IfsApps10Sim
from tests.conftest import BrokerFactory, ifs_connector
from tests.io.test_server import Answer, Client

LIMIT = 20.0


async def exchange(
    server: BrokerServer, *requests: bytes, methods: tuple[str, ...] = ()
) -> list[Answer]:
    """Each request in turn on one keep-alive connection to the admin listener."""
    async with asyncio.timeout(LIMIT):
        client = await Client.connect(server.admin_port)
        try:
            answers = []
            for index, request in enumerate(requests):
                await client.send(request)
                method = methods[index] if index < len(methods) else "GET"
                answers.append(await client.response(method))
            return answers
        finally:
            client.close()


def get(path: str, method: str = "GET", extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"


def post(path: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + extra + b"\r\n" + body


def form(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return post(path, body, b"Content-Type: application/x-www-form-urlencoded\r\n" + extra)


def error_of(answer: Answer) -> dict[str, Any]:
    assert answer.get("Content-Type") == "application/json"
    body = orjson.loads(answer.body)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "connector"}
    assert answer.get("X-Broker-Error") == body["error"]["code"]
    return dict(body["error"])


async def broker(
    make_broker: BrokerFactory, sim: IfsApps10Sim, ca_file: str, **top: Any
) -> BrokerServer:
    server = await make_broker({"ifs": ifs_connector(sim, ca_file)}, **top)
    await server.broker.wait_ready(10)
    return server


class TestJsonEndpoints:
    async def test_each_answer_keeps_the_connection_and_says_server_erp_broker(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """GET /healthz, /readyz, /connectors, /connectors/ifs on one connection: indented
        JSON, `application/json`, a length, `Server: erp-broker`, the connection kept."""
        server = await broker(make_broker, ifs_sim, ca_file)
        paths = ("/healthz", "/readyz", "/connectors", "/connectors/ifs", "/healthz?x=1")
        answers = await exchange(server, *(get(p) for p in paths))
        for path, answer in zip(paths, answers, strict=True):
            assert answer.status == 200, path
            assert answer.get("Content-Type") == "application/json", path
            assert answer.get("Server") == "erp-broker", path
            assert answer.get("Content-Length") == str(len(answer.body)), path
            assert answer.get("Connection") is None, path
            assert answer.get("Date") is not None, path
            assert answer.body == orjson.dumps(
                orjson.loads(answer.body), option=orjson.OPT_INDENT_2
            )
        healthz, readyz, connectors, one, _ = (orjson.loads(a.body) for a in answers)
        assert healthz == {"status": "ok"}
        assert readyz["ready"] is True and readyz["draining"] is False
        assert set(readyz) == {"ready", "draining", "connectors", "store"}
        assert one == connectors["ifs"] | {"expires_in": one["expires_in"]}
        assert one["route"] == "/ifs/" and one["token_state"] == "valid"

    async def test_head_gets_the_heads_of_get_without_a_body(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """HEAD on a GET endpoint (and on a path that does not exist): the same status and
        headers, the length of the body GET would have, no body (the next answer follows at
        once on the same connection)."""
        server = await broker(make_broker, ifs_sim, ca_file)
        answers = await exchange(
            server,
            get("/healthz", "HEAD"),
            get("/nope", "HEAD"),
            get("/", "HEAD"),
            get("/healthz"),
            methods=("HEAD", "HEAD", "HEAD", "GET"),
        )
        head, missing, page, full = answers
        assert head.status == 200 and head.get("Content-Length") == str(len(full.body))
        assert head.get("Content-Type") == "application/json"
        assert head.get("Server") == "erp-broker"
        assert missing.status == 404 and int(missing.get("Content-Length") or 0) > 0
        assert missing.get("X-Broker-Error") == "not_found"
        assert page.status == 200 and page.get("Content-Type") == "text/html; charset=utf-8"
        assert int(page.get("Content-Length") or 0) > 1000
        assert full.status == 200 and full.body == b'{\n  "status": "ok"\n}'

    async def test_metrics_are_prometheus_text(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """/metrics: prometheus_client's exposition and its content type."""
        server = await broker(make_broker, ifs_sim, ca_file)
        (answer,) = await exchange(server, get("/metrics"))
        assert answer.status == 200 and answer.get("Content-Type") == CONTENT_TYPE_LATEST
        assert answer.get("Server") == "erp-broker"
        families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
        (up,) = families["erp_broker_connector_up"].samples
        assert up.labels == {"connector": "ifs"} and up.value == 1

    async def test_unknown_paths_and_methods_are_json_errors(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """404 `not_found` naming the path; 405 `method_not_allowed` with `Allow` (HEAD goes
        with GET); an unknown connector 404 `no_route`; a connector's name percent-decoded."""
        server = await broker(make_broker, ifs_sim, ca_file)
        answers = await exchange(
            server,
            get("/nope"),
            get("/healthz/"),
            get("//healthz"),
            get("/connectors//refresh"),
            get("/healthz", "DELETE"),
            post("/healthz"),
            get("/connectors/ifs/refresh"),
            get("/quitquitquit"),
            get("/connectors/nope"),
            post("/connectors/nope/refresh"),
            get("/connectors/i%66s"),
        )
        nope, slash, double, empty, delete, post_, refresh, quit_, unknown, unknown2, ifs = answers
        for answer, path in ((nope, "/nope"), (slash, "/healthz/"), (double, "//healthz")):
            assert answer.status == 404
            assert error_of(answer) == {
                "code": "not_found",
                "message": f"no admin endpoint at {path}",
                "connector": None,
            }
            assert answer.get("Server") == "erp-broker"
        assert empty.status == 404 and error_of(empty)["code"] == "not_found"
        for answer, method, allowed in (
            (delete, "DELETE", "GET, HEAD"),
            (post_, "POST", "GET, HEAD"),
            (refresh, "GET", "POST"),
            (quit_, "GET", "POST"),
        ):
            assert answer.status == 405 and answer.get("Allow") == allowed
            assert error_of(answer) == {
                "code": "method_not_allowed",
                "message": f"{method} is not allowed here: {allowed}",
                "connector": None,
            }
        for answer in (unknown, unknown2):
            assert answer.status == 404
            assert error_of(answer)["message"] == "no connector named 'nope'"
        assert ifs.status == 200 and orjson.loads(ifs.body)["route"] == "/ifs/"


class TestActions:
    async def test_refresh_and_quit_from_loopback(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """POST /connectors/ifs/refresh: a new token, the connector's status; /quitquitquit
        asks the broker to stop."""
        server = await broker(make_broker, ifs_sim, ca_file)
        before = len(ifs_sim.token_requests)
        refresh, quit_ = await exchange(
            server, post("/connectors/ifs/refresh"), post("/quitquitquit")
        )
        assert refresh.status == 200 and refresh.get("Content-Type") == "application/json"
        body = orjson.loads(refresh.body)
        assert body["refreshed"] is True and body["route"] == "/ifs/"
        assert len(ifs_sim.token_requests) == before + 1
        assert quit_.status == 200 and orjson.loads(quit_.body) == {"stopping": True}
        assert server.broker.shutdown_requested.is_set()

    async def test_a_wrong_admin_token_is_403(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """With admin_token: no bearer or a wrong one 403 `forbidden`, the right one passes."""
        server = await broker(make_broker, ifs_sim, ca_file, admin_token="wire-token-77")
        none, wrong, right = await exchange(
            server,
            post("/connectors/ifs/refresh"),
            post("/connectors/ifs/refresh", extra=b"Authorization: Bearer nope\r\n"),
            post("/connectors/ifs/refresh", extra=b"Authorization: Bearer wire-token-77\r\n"),
        )
        for answer in (none, wrong):
            assert answer.status == 403 and error_of(answer)["code"] == "forbidden"
            assert b"wire-token-77" not in answer.body
        assert right.status == 200


class TestPage:
    async def test_page_and_its_actions(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """GET /: HTML under the page's security headers. A form post from this origin: 303
        back to the page, whose banner tells the result. Another origin: 403 in plain text.
        An unknown connector: the page again, 404, with a banner saying so."""
        server = await broker(make_broker, ifs_sim, ca_file)
        origin = b"Origin: http://127.0.0.1\r\n"
        page, done, evil, unknown = await exchange(
            server,
            get("/"),
            form("/page/connectors/ifs/refresh", b"do=refresh", origin),
            form("/page/connectors/ifs/refresh", b"do=refresh", b"Origin: http://evil.example\r\n"),
            form("/page/connectors/nope/test", b"do=test", b"Sec-Fetch-Site: same-origin\r\n"),
        )
        assert page.status == 200 and page.get("Content-Type") == "text/html; charset=utf-8"
        policy = page.get("Content-Security-Policy") or ""
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        for name, value in (
            ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "same-origin"),
            ("Cache-Control", "no-store"),
            ("Server", "erp-broker"),
        ):
            for answer in (page, evil, unknown):
                assert answer.get(name) == value, (name, answer.status)
        assert page.body.startswith(b"<!doctype html>")
        assert done.status == 303 and done.get("Content-Type") == "text/plain; charset=utf-8"
        location = done.get("Location") or ""
        assert re.fullmatch(r"/\?result=[\w-]+#c-ifs", location), location
        assert done.body == b"303: See Other"
        assert evil.status == 403 and evil.get("Content-Type") == "text/plain; charset=utf-8"
        assert evil.body == b"refused: a request from another origin\n"
        assert "'nonce-" not in (evil.get("Content-Security-Policy") or "")
        assert unknown.status == 404 and unknown.get("Content-Type") == "text/html; charset=utf-8"
        assert b"no connector named &#x27;nope&#x27;" in unknown.body
        (back,) = await exchange(server, get(location.partition("#")[0]))
        assert back.status == 200
        assert re.search(rb'class="banner ok"[^>]*>ifs: new credential obtained', back.body)

    async def test_the_token_as_a_form_field(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """With admin_token, a browser sends it as the form field: the right one acts (303),
        a wrong one gets the page with a 403 and a banner, never the token echoed."""
        server = await broker(make_broker, ifs_sim, ca_file, admin_token="form-token-5")
        wrong, right = await exchange(
            server,
            form("/page/connectors/ifs/refresh", b"admin_token=nope&do=refresh"),
            form("/page/connectors/ifs/refresh", b"admin_token=form-token-5&do=refresh"),
        )
        assert wrong.status == 403 and wrong.get("Content-Type") == "text/html; charset=utf-8"
        assert b"refresh refused" in wrong.body and b"form-token-5" not in wrong.body
        assert right.status == 303


class TestRefusals:
    async def test_a_malformed_request_gets_the_brokers_json_error(
        self, make_broker: BrokerFactory, ifs_sim: IfsApps10Sim, ca_file: str
    ) -> None:
        """What the listener refuses itself (a broken header, no Host on HTTP/1.1) is answered as the
        proxy listener answers it: the broker's JSON 400, never a framework's name."""
        server = await broker(make_broker, ifs_sim, ca_file)
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
        ):
            (answer,) = await exchange(server, request)
            assert answer.status == 400 and error_of(answer)["code"] == "bad_request"
            assert answer.get("Connection") == "close"
            assert answer.get("Server") == "erp-broker"
