"""The status page's actions, below the browser: peers and origins a browser test cannot fake.

Every test server listens on loopback, so a non-loopback peer exists only as a mocked request
(as in tests/test_security.py's TestAdminGuard).
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from broker.admin import SERVER, _require_operator, connector_info
from broker.app import Broker, BrokerServer
from broker.config import parse_config
from broker.page import StatusPage, cross_site

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
    transport = type(
        "T",
        (),
        {
            "get_extra_info": lambda self, name, default=None: (
                (peer, 1234) if name == "peername" else default
            )
        },
    )()
    app: Any = {SERVER: target or server()}
    return make_mocked_request(
        "POST",
        "/page/connectors/nowhere/refresh",
        headers={"Host": "127.0.0.1:9091", **(headers or {})},
        transport=transport,
        app=app,
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
