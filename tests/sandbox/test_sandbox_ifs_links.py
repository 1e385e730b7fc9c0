"""The IFS simulator's absolute URLs: server-driven paging, @odata.id, Location, gzip."""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from broker.sandbox import IfsApps10Sim
from broker.sandbox.ifs_projections import page_of

API = "/main/ifsapplications/projection/v1"
ROWS: list[dict[str, Any]] = [{"n": n} for n in range(7)]


class TestPageOf:
    def test_skiptoken_pages_through_top_and_skip(self) -> None:
        """$skip/$top pick the rows; each page has page_size of them and the next page's query
        keeps the client's options as sent, with a $skiptoken."""
        page = page_of(ROWS, "$skip=1&$top=5&$select=a%2Cb", 2)
        assert page.rows == ROWS[1:3]
        assert page.next_query == "$skip=1&$top=5&$select=a%2Cb&$skiptoken=2"
        page = page_of(ROWS, page.next_query, 2)
        assert page.rows == ROWS[3:5] and page.next_query is not None
        page = page_of(ROWS, page.next_query, 2)
        assert page.rows == ROWS[5:6] and page.next_query is None

    def test_no_page_size_no_paging(self) -> None:
        """Without a page size every chosen row comes at once."""
        assert page_of(ROWS, "$top=3", None) == page_of(ROWS, "$top=3", 3)
        assert page_of(ROWS, "", None).rows == ROWS

    def test_bad_options(self) -> None:
        """A non-number $top, $skip or $skiptoken is refused, named."""
        for query in ("$top=x", "$skip=-1", "$skiptoken=abc"):
            with pytest.raises(ValueError, match=r"Invalid \$"):
                page_of(ROWS, query, 2)


class TestSimulatorLinks:
    async def bearer(self, http: aiohttp.ClientSession, ifs: IfsApps10Sim) -> dict[str, str]:
        form = {
            "grant_type": "password",
            "client_id": ifs.client_id,
            "client_secret": ifs.client_secret,
            "username": ifs.username,
            "password": ifs.password,
        }
        url = f"{ifs.url}/auth/realms/{ifs.realm}/protocol/openid-connect/token"
        async with http.post(url, data=form) as response:
            return {"Authorization": f"Bearer {(await response.json())['access_token']}"}

    async def test_next_links_are_absolute_and_lead_through_every_row(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """With a page size, @odata.nextLink (absolute, on the ERP) pages through the set."""
        ifs.page_size = 1
        headers = await self.bearer(http, ifs)
        url: str | None = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet?$select=CustomerId"
        seen = []
        while url is not None:
            async with http.get(yarl.URL(url, encoded=True), headers=headers) as response:
                assert response.status == 200
                body = await response.json()
            seen += [row["CustomerId"] for row in body["value"]]
            url = body.get("@odata.nextLink")
            assert url is None or url.startswith(f"{ifs.url}{API}/CustomerHandling.svc/")
        assert seen == ["10/7", "ACME", "1000"]

    async def test_prefer_maxpagesize_is_applied(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """Prefer: odata.maxpagesize=2 pages the answer and says so in Preference-Applied."""
        headers = {**await self.bearer(http, ifs), "Prefer": "odata.maxpagesize=2"}
        url = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet"
        async with http.get(url, headers=headers) as response:
            body = await response.json()
            assert response.headers["Preference-Applied"] == "odata.maxpagesize=2"
        assert len(body["value"]) == 2 and body["@odata.nextLink"].endswith("?$skiptoken=2")

    async def test_full_metadata_has_entity_ids(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """odata.metadata=full adds @odata.id: the entity's absolute URL, key encoded."""
        headers = {
            **await self.bearer(http, ifs),
            "Accept": "application/json;odata.metadata=full",
        }
        url = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet?$top=1"
        async with http.get(url, headers=headers) as response:
            (row,) = (await response.json())["value"]
        want = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet(CustomerId='10%2F7')"
        assert row["@odata.id"] == want

    async def test_create_answers_location(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession
    ) -> None:
        """POST answers 201 with Location: the new entity's absolute URL, which reads it."""
        headers = await self.bearer(http, ifs)
        url = f"{ifs.url}{API}/WorkOrderHandling.svc/ActiveSeparateSet"
        async with http.post(url, json={"WoNo": 77, "Contract": "1"}, headers=headers) as response:
            assert response.status == 201
            location = response.headers["Location"]
        assert location == f"{url}(WoNo=77)"
        async with http.get(location, headers=headers) as response:
            assert (await response.json())["WoNo"] == 77

    async def test_gzip_when_asked(self, ifs: IfsApps10Sim) -> None:
        """Accept-Encoding: gzip gets a gzip body; without it, or with the switch off, plain."""
        url = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet"
        async with aiohttp.ClientSession(auto_decompress=False) as raw:
            headers = await self.bearer(raw, ifs)
            for accept, switch, coded in (
                ("gzip", True, True),
                ("identity", True, False),
                ("gzip", False, False),
            ):
                ifs.gzip = switch
                async with raw.get(url, headers={**headers, "Accept-Encoding": accept}) as response:
                    body = await response.read()
                    assert (response.headers.get("Content-Encoding") == "gzip") is coded
                value = orjson.loads(gzip.decompress(body) if coded else body)["value"]
                assert len(value) == 3
