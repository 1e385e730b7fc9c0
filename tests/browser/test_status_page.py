"""The status page on the admin listener, driven in real headless Chromium.

Brokers are real `erp-broker run` processes against the simulators; the browser is Debian's
Chromium through Selenium. Selenium blocks, and the simulators live on this test's event loop,
so every browser call runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim
from tests.browser.chromium import chromium
from tests.conftest import SimStarter, ifs_connector, infor_connector, pso_connector
from tests.procs import BrokerProcess, free_port

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "page-admin-token-0c9f7e"
#: Another site, as the browser sees it; Chromium resolves it to loopback (--host-resolver-rules).
OTHER_SITE = "elsewhere.test"
WAIT = 20.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(extra=(f"--host-resolver-rules=MAP {OTHER_SITE} 127.0.0.1",)) as driver:
        yield driver


def config(tmp_path: Path, connectors: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "store": {"sqlite": str(tmp_path / "tokens.db")},
        "grace_period": 1,
        "connectors": connectors,
        **top,
    }


class Page:
    """The status page in the browser; each method runs in a worker thread."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    async def open(self) -> None:
        await asyncio.to_thread(self.driver.get, self.url)

    async def source(self) -> str:
        return str(await asyncio.to_thread(lambda: self.driver.page_source))

    async def script(self, code: str) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, code)

    async def cards(self) -> dict[str, dict[str, Any]]:
        """What each connector's card shows, read in the page (one script, no stale element)."""
        return dict(
            await self.script(
                """
                const out = {};
                for (const card of document.querySelectorAll('article[data-connector]')) {
                  const q = s => card.querySelector(s);
                  const expiry = q('[data-expires-at]');
                  out[card.dataset.connector] = {
                    state: q('.state').textContent.trim(),
                    colour: getComputedStyle(q('.state')).backgroundColor,
                    where: q('.where').textContent.replace(/\\s+/g, ' ').trim(),
                    expires_at: expiry ? Number(expiry.dataset.expiresAt) : null,
                    expiry_text: q('.expires').textContent.trim(),
                    error: q('.error').textContent,
                    cause: q('.cause') ? q('.cause').textContent : null,
                    has_openapi_link: !!q('a[href$="/openapi"]'),
                  };
                }
                return out;
                """
            )
        )

    async def banner(self) -> str:
        return str(
            await self.script(
                "const b = document.querySelector('.banner');"
                "return b ? b.className + ': ' + b.textContent : '';"
            )
        )

    async def act(self, connector: str, action: str, token: str | None = None) -> None:
        """Type the admin token (if given) into the card's form and press the action's button."""

        def run() -> None:
            from selenium.webdriver.common.by import By

            card = self.driver.find_element(
                By.CSS_SELECTOR, f'article[data-connector="{connector}"]'
            )
            if token is not None:
                card.find_element(By.NAME, "admin_token").send_keys(token)
            card.find_element(By.CSS_SELECTOR, f'button[value="{action}"]').click()

        await asyncio.to_thread(run)

    async def until_states(
        self, states: dict[str, str], timeout: float = WAIT
    ) -> dict[str, dict[str, Any]]:
        """Load the page until these connectors show these states (logins take a moment)."""
        async with asyncio.timeout(timeout):
            while True:
                await self.open()
                cards = await self.cards()
                if all(cards.get(n, {}).get("state") == s for n, s in states.items()):
                    return cards
                await asyncio.sleep(0.2)

    async def wait_for(self, condition: str, timeout: float = WAIT) -> Any:
        """Poll a JavaScript expression in the page until it is truthy."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    value = await self.script(f"return ({condition});")
                except Exception:  # a page being replaced mid-call: ask again
                    value = None
                if value:
                    return value
                await asyncio.sleep(0.1)


def secrets_of(*sims: Any) -> list[str]:
    """Every configured secret and every token the simulators issued."""
    values: list[str] = []
    for sim in sims:
        for attr in ("client_secret", "password", "saak", "sask"):
            value = getattr(sim, attr, None)
            if isinstance(value, str) and len(value) >= 6:
                values.append(value)
        values.extend(sim._issued)  # every token handed out, as in tests/test_leaks.py
    return values


class TestStatusPage:
    async def test_every_connector_with_its_state_and_no_secret(
        self,
        browser: Any,
        start_sim: SimStarter[Any],
        ca_file: str,
        tmp_path: Path,
    ) -> None:
        """The page lists every connector of a running broker with type, route, host and an
        expiry countdown; a connector with a wrong password is shown paused, in its colour,
        with the cause; an ERP's error text with <script> is shown as text and never runs; no
        configured secret and no issued token is anywhere in the page's HTML."""
        ifs = await start_sim(IfsApps10Sim())
        pso = await start_sim(PsoSim())
        infor = await start_sim(InforIonSim())
        hostile = await start_sim(IfsApps10Sim())
        script = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
        hostile.queue_token_response(
            401,
            body={"error": "invalid_grant", "error_description": f"Locked {script}"},
            count=50,
        )
        connectors = {
            "ifs": ifs_connector(ifs, ca_file),
            "pso": pso_connector(pso, ca_file),
            "infor": infor_connector(infor, ca_file),
            "locked": ifs_connector(ifs, ca_file, password="wrong-password-123"),
            "hostile": ifs_connector(hostile, ca_file),
        }
        proc = await BrokerProcess(config(tmp_path, connectors), tmp_path).start()
        try:
            page = Page(browser, proc.admin_url + "/")
            cards = await page.until_states(
                {"ifs": "up", "pso": "up", "infor": "up", "locked": "paused", "hostile": "paused"}
            )
            assert sorted(cards) == sorted(connectors)
            for name, sim in (("ifs", ifs), ("pso", pso), ("infor", infor)):
                assert cards[name]["state"] == "up", cards[name]
                assert f"/{name}/ → {URL(sim.url).host}" in cards[name]["where"]
            assert cards["ifs"]["where"].startswith("ifs_apps10")
            assert cards["pso"]["where"].startswith("ifs_pso")
            assert cards["infor"]["where"].startswith("infor_ion")
            assert cards["ifs"]["expires_at"] and cards["infor"]["expires_at"]
            assert cards["ifs"]["expiry_text"].startswith("in ")
            assert cards["ifs"]["has_openapi_link"] and not cards["pso"]["has_openapi_link"]

            locked = cards["locked"]
            assert locked["state"] == "paused"
            assert locked["colour"] != cards["ifs"]["colour"]
            assert locked["cause"], locked
            assert "rejected" in locked["error"].lower() or "invalid" in locked["error"].lower()

            hostile_card = cards["hostile"]
            assert hostile_card["state"] == "paused"
            assert "<script>window.pwned = 1</script>" in hostile_card["error"]
            assert await page.script("return window.pwned === undefined")
            assert await page.script("return document.querySelectorAll('main script').length") == 0

            rendered = await page.source()
            async with aiohttp.ClientSession() as http, http.get(page.url) as resp:
                served = await resp.text()
            assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in served
            for secret in [*secrets_of(ifs, pso, infor, hostile), "wrong-password-123"]:
                assert secret not in rendered and secret not in served
        finally:
            await proc.kill()

    async def test_refresh_changes_the_expiry_and_test_shows_its_result(
        self,
        browser: Any,
        start_sim: SimStarter[Any],
        ca_file: str,
        tmp_path: Path,
    ) -> None:
        """Pressing "Refresh credential" gets a new credential: the page comes back with a
        result banner and a later expiry. "Test connection" shows the probe's outcome. The
        expiry counts down in the page, and the page reloads itself."""
        ifs = await start_sim(IfsApps10Sim())
        infor = await start_sim(InforIonSim())
        connectors = {"ifs": ifs_connector(ifs, ca_file), "infor": infor_connector(infor, ca_file)}
        proc = await BrokerProcess(config(tmp_path, connectors), tmp_path).start()
        try:
            await ifs.wait_for_token_requests(1)
            page = Page(browser, proc.admin_url + "/")
            await page.open()
            await page.wait_for("document.querySelector('[data-connector=ifs] [data-expires-at]')")
            before = (await page.cards())["ifs"]["expires_at"]
            requests = ifs.count_token_requests()
            await page.act("ifs", "refresh")
            await page.wait_for("location.search.startsWith('?result=')")
            assert "ok: ifs: new credential" in await page.banner()
            assert ifs.count_token_requests() == requests + 1
            after = (await page.cards())["ifs"]["expires_at"]
            assert after > before

            await page.act("infor", "test")
            await page.wait_for("document.querySelector('.banner')?.textContent.includes('infor')")
            assert "ok: infor: connection works" in await page.banner()

            # Between reloads the countdown ticks; then the page reloads itself, banner gone.
            shown = (await page.cards())["ifs"]["expiry_text"]
            await page.wait_for(f"document.querySelector('.expiry').textContent != {shown!r}")
            await page.wait_for("location.search === '' && !document.querySelector('.banner')")
        finally:
            await proc.kill()

    async def test_actions_need_the_token_and_this_page_as_origin(
        self,
        browser: Any,
        start_sim: SimStarter[Any],
        ca_file: str,
        tmp_path: Path,
    ) -> None:
        """With admin_token configured, an action from the page without the token is refused
        and nothing reaches the ERP; with the token it is done. A form on another site that
        posts to the action is refused, even with the right token, and changes nothing."""
        ifs = await start_sim(IfsApps10Sim())
        connectors = {"ifs": ifs_connector(ifs, ca_file)}
        proc = await BrokerProcess(
            config(tmp_path, connectors, admin_token=ADMIN_TOKEN), tmp_path
        ).start()
        other = web.Application()
        port = int(proc.admin_url.rsplit(":", 1)[1])
        forged = (
            f'<form method="post" action="http://127.0.0.1:{port}/page/connectors/ifs/refresh">'
            f'<input name="admin_token" value="{ADMIN_TOKEN}"></form>'
            "<script>document.forms[0].submit()</script>"
        )

        async def attack(_: web.Request) -> web.Response:
            return web.Response(text=forged, content_type="text/html")

        other.router.add_get("/", attack)
        runner = web.AppRunner(other)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        other_port = runner.addresses[0][1]
        try:
            await ifs.wait_for_token_requests(1)
            requests = ifs.count_token_requests()
            page = Page(browser, proc.admin_url + "/")
            await page.open()
            await page.act("ifs", "refresh")
            await page.wait_for("document.querySelector('.banner')")
            assert "fail: refresh refused" in await page.banner()
            assert ifs.count_token_requests() == requests

            await page.open()
            await page.act("ifs", "refresh", token=ADMIN_TOKEN)
            await page.wait_for("location.search.startsWith('?result=')")
            assert "ok: ifs: new credential" in await page.banner()
            assert ifs.count_token_requests() == requests + 1
            assert ADMIN_TOKEN not in await page.source()

            elsewhere = Page(browser, f"http://{OTHER_SITE}:{other_port}/")
            await elsewhere.open()
            await elsewhere.wait_for("document.body.textContent.includes('refused')")
            assert "cross-site" in await elsewhere.script("return document.body.textContent")
            assert ifs.count_token_requests() == requests + 1
        finally:
            await runner.cleanup()
            await proc.kill()

    async def test_the_demo_prints_its_page_first(self, browser: Any) -> None:
        """`erp-broker demo`'s first line is the status page's URL, and that page shows the
        demo's three connectors up."""
        admin = f"127.0.0.1:{free_port()}"
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "demo",
            "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", admin,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert demo.stdout is not None
            async with asyncio.timeout(WAIT):
                first = (await demo.stdout.readline()).decode()
            found = re.search(r"http://[0-9.:]+/", first)
            assert found is not None and found.group(0) == f"http://{admin}/", first
            page = Page(browser, found.group(0))
            cards = await page.until_states({"ifs": "up", "pso": "up", "infor": "up"})
            assert sorted(cards) == ["ifs", "infor", "pso"]
        finally:
            demo.send_signal(signal.SIGINT)
            async with asyncio.timeout(WAIT):
                await demo.wait()
