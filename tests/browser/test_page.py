"""The status page below the browser: what it renders over HTTP, and the peers and origins a
browser test cannot fake (every test server listens on loopback, so a non-loopback peer exists
only as a request built by hand, as in tests/test_security.py's TestAdminGuard).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from broker.admin import _require_operator, connector_info
from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.page import StatusPage, cross_site, render_error
from broker.routes import AdminRequest
from broker.sandbox import IfsApps10Sim
from tests.conftest import BrokerFactory, ifs_connector

IFS = {
    "type": "ifs_apps10",
    "domain": "e.example",
    "realm": "r",
    "client_id": "c",
    "client_secret": "s",
    "username": "u",
    "password": "p",
}


def server(**top: Any) -> BrokerServer:
    return BrokerServer(Broker(parse_config({"connectors": {"ifs": IFS}, **top})))


def request(peer: str, headers: dict[str, str] | None = None, target: Any = None) -> Any:
    return AdminRequest(
        target or server(),
        "POST",
        "/page/connectors/nowhere/refresh",
        CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1:9091", **(headers or {})})),
        peer,
        match_info={"name": "nowhere"},
    )


def page(target: BrokerServer) -> StatusPage:
    """The page as admin_app wires it: the admin API's own info and guard."""
    return StatusPage(target, connector_info, _require_operator)


class TestPageActions:
    async def test_non_loopback_peer_is_refused_without_the_token(self) -> None:
        """Without admin_token, an action from a non-loopback peer is refused (403) before
        anything is looked up; from loopback it goes on (here: to the unknown connector)."""
        target = server()
        handler = page(target)
        refused = await handler.refresh(request("10.1.2.3", target=target))
        assert refused.status == 403
        assert b"refresh refused" in refused.body  # type: ignore[attr-defined]
        allowed = await handler.refresh(request("127.0.0.1", target=target))
        assert allowed.status == 404

    async def test_the_admin_token_lets_any_peer_act(self) -> None:
        """With admin_token, the bearer (or the form field) is what counts, from any peer."""
        target = server(admin_token="page-token-42")
        handler = page(target)
        assert (await handler.refresh(request("127.0.0.1", target=target))).status == 403
        sent = {"Authorization": "Bearer page-token-42"}
        assert (await handler.refresh(request("10.1.2.3", sent, target=target))).status == 404


class TestCrossSite:
    @pytest.mark.parametrize(
        "headers",
        [
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Referer": "http://evil.example/form"},
            {"Origin": "http://127.0.0.1:9091", "Sec-Fetch-Site": "cross-site"},
        ],
    )
    def test_other_origins_are_refused(self, headers: dict[str, str]) -> None:
        """A request another site's page made (by any of the three signals) is refused."""
        assert cross_site(request("127.0.0.1", headers)) is not None

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Sec-Fetch-Site": "same-origin"},
            {"Origin": "http://127.0.0.1:9091"},
            {"Referer": "http://127.0.0.1:9091/?result=x"},
        ],
    )
    def test_this_page_and_non_browsers_pass(self, headers: dict[str, str]) -> None:
        """The page's own origin passes; so does a client that sends none of them (curl),
        which the admin guard alone then decides on."""
        assert cross_site(request("127.0.0.1", headers)) is None


async def card_of(http: aiohttp.ClientSession, target: BrokerServer, name: str) -> str:
    """The HTML of one connector's card on the page, as served."""
    async with http.get(target.admin_url + "/") as resp:
        assert resp.status == 200
        html = await resp.text()
    match = re.search(rf'<article class="card [^"]*" id="c-{name}".*?</article>', html, re.S)
    assert match is not None, html
    return match.group(0)


class TestRendering:
    async def test_a_token_request_in_flight_shows_refreshing(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """While a token request is under way the card says "refreshing"; then "up" again."""
        target = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        await target.broker.wait_ready(10)
        async with aiohttp.ClientSession() as http:
            assert 'data-state="up"' in await card_of(http, target, "ifs")
            ifs_sim.token_delay = 1.0
            refreshing = asyncio.create_task(target.broker.connectors["ifs"].tokens.refresh_now())
            await ifs_sim.wait_for_token_requests(2, timeout=10)  # the slow one has arrived
            assert 'data-state="refreshing"' in await card_of(http, target, "ifs")
            await refreshing
            assert 'data-state="up"' in await card_of(http, target, "ifs")

    async def test_requests_errors_and_retries_of_the_last_minutes(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """The card counts what the proxy answered: requests, 5xx answers and retries."""
        target = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        ifs_sim.queue_api_response(502, body="bad gateway")
        ifs_sim.queue_api_response(401)  # the credential is rejected once: one auth retry
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                async with http.get(target.proxy_url + "/ifs/_test/echo/x") as resp:
                    await resp.read()
            card = await card_of(http, target, "ifs")
        counts = re.findall(r'<span class="count[^"]*">([0-9]+)</span>', card)
        assert counts == ["4", "1", "1"], card

    async def test_the_policy_allows_only_the_pages_own_style_and_script(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """Content-Security-Policy: nothing from elsewhere; inline style and script only with
        this response's nonce, which the page's one <style> and one <script> carry."""
        target = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        async with aiohttp.ClientSession() as http, http.get(target.admin_url + "/") as resp:
            policy = resp.headers["Content-Security-Policy"]
            html = await resp.text()
        nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
        assert nonce is not None and "default-src 'none'" in policy
        assert "form-action 'self'" in policy and "frame-ancestors 'none'" in policy
        assert re.findall(r"<(style|script)( [^>]*)?>", html) == [
            ("style", f' nonce="{nonce.group(1)}"'),
            ("script", f' nonce="{nonce.group(1)}"'),
        ]


class TestErrorText:
    def test_cause_and_hint_are_shown_when_connectors_gives_them(self) -> None:
        """An error given as {message, cause, hint} shows all three, each escaped."""
        html = render_error(
            {
                "last_error": {
                    "message": "Invalid user credentials <b>",
                    "cause": "invalid_credentials",
                    "hint": "the password of user <svc>",
                }
            }
        )
        assert '<span class="cause">invalid_credentials</span>' in html
        assert "Invalid user credentials &lt;b&gt;" in html
        assert "Check: the password of user &lt;svc&gt;" in html

    def test_a_plain_error_shows_its_kind(self) -> None:
        """Today's form: a text and a kind."""
        html = render_error({"last_error": "boom & co", "last_error_kind": "transient"})
        assert '<span class="cause">transient</span>' in html and "boom &amp; co" in html
