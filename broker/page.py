"""The status page on the admin listener: one server-rendered HTML page for people.

Everything on it is what ``/connectors`` and ``/readyz`` already show, rendered with
``html.escape`` (a connector's error text is data from an ERP). No asset comes from elsewhere;
the little CSS and script carry a per-response nonce under a strict Content-Security-Policy.

Actions are POSTs, never GETs. They pass two checks: the request comes from this page's own
origin (``Sec-Fetch-Site``, else ``Origin``, else ``Referer``), and the admin API's own guard
(loopback only, or the admin token, which a browser sends as the form field ``admin_token``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from yarl import URL

from . import __version__
from .answers import page_error, page_refusal
from .errors import NoRoute, ProxyError
from .routes import AdminRequest, Router
from .server import Response

if TYPE_CHECKING:
    from .metrics import Metrics
    from .runtime import Served
    from .upstream import Connector

#: How often the page reloads itself, and how often per-minute activity is sampled.
RELOAD_SECONDS = 10
SAMPLE_SECONDS = 60.0
#: Per-minute samples kept: the page shows the last five minutes.
WINDOW_MINUTES = 5
#: Action results kept for the banner after the redirect back to the page.
RESULTS_KEPT = 32

ConnectorInfo = Callable[["Connector"], dict[str, Any]]
Guard = Callable[[AdminRequest, str | None], None]


@dataclass(slots=True)
class Totals:
    """Cumulative counts of one connector, read from the metrics at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    retries: float = 0.0

    def minus(self, earlier: Totals) -> Totals:
        return Totals(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            self.retries - earlier.retries,
        )


def read_totals(metrics: Metrics) -> dict[str, Totals]:
    """Requests, 5xx answers and retries per connector, from the counters the proxy keeps."""
    totals: dict[str, Totals] = {}
    for family in metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            entry = totals.setdefault(sample.labels["connector"], Totals())
            entry.requests += sample.value
            if sample.labels["status"].startswith("5"):
                entry.errors += sample.value
    for family in metrics.retries.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                totals.setdefault(sample.labels["connector"], Totals()).retries += sample.value
    return totals


@dataclass(slots=True)
class Activity:
    """A ring of per-minute snapshots of the counters: what happened in the last minutes."""

    metrics: Metrics
    snapshots: deque[dict[str, Totals]] = field(
        default_factory=lambda: deque(maxlen=WINDOW_MINUTES)
    )

    def sample(self) -> None:
        self.snapshots.append(read_totals(self.metrics))

    def recent(self) -> tuple[dict[str, Totals], list[dict[str, Totals]]]:
        """Counts since the oldest snapshot, and each minute's counts (oldest first, the
        current partial minute last)."""
        now = read_totals(self.metrics)
        marks = [*self.snapshots, now]
        base = marks[0]
        window = {name: t.minus(base.get(name, Totals())) for name, t in now.items()}
        minutes = [
            {name: t.minus(before.get(name, Totals())) for name, t in after.items()}
            for before, after in pairwise(marks)
        ]
        return window, minutes


@dataclass(slots=True)
class Banner:
    ok: bool
    text: str


class StatusPage:
    """``GET /`` and its two actions; ``info`` and ``guard`` are the admin API's own."""

    def __init__(self, server: Served, info: ConnectorInfo, guard: Guard) -> None:
        self.server = server
        self.info = info
        self.guard = guard
        self.activity = Activity(server.broker.metrics)
        self.results: OrderedDict[str, Banner] = OrderedDict()

    def add_routes(self, router: Router) -> None:
        router.add_get("/", self.show)
        router.add_post("/page/connectors/{name}/refresh", self.refresh)
        router.add_post("/page/connectors/{name}/test", self.test)
        router.background.append(self._sampling)

    @contextlib.asynccontextmanager
    async def _sampling(self) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                self.activity.sample()
                await asyncio.sleep(SAMPLE_SECONDS)

        task = asyncio.create_task(loop(), name="status-page-activity")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- handlers ----------------------------------------------------------------------------

    async def show(self, request: AdminRequest) -> Response:
        banner = self.results.get(request.query.get("result", ""))
        return self._page(banner)

    async def refresh(self, request: AdminRequest) -> Response:
        return await self._act(request, "refresh", self._refresh)

    async def test(self, request: AdminRequest) -> Response:
        return await self._act(request, "test", self._test)

    async def _refresh(self, connector: Connector) -> Banner:
        try:
            token = await connector.tokens.refresh_now()
        except ProxyError as exc:
            return Banner(False, f"{connector.name}: refresh failed: {exc}")
        expiry = (
            "no expiry"
            if token.expires_at is None
            else ("expires in " + _duration(token.expires_at - time.time()))
        )
        return Banner(True, f"{connector.name}: new credential obtained ({expiry})")

    async def _test(self, connector: Connector) -> Banner:
        from .probe import probe  # the probe pulls in the CLI's client setup: only when used

        result = await probe(connector.name, connector.config)
        timing = ", ".join(
            part
            for part in (
                f"login {result.token_ms:.0f} ms" if result.token_ms is not None else "",
                f"check {result.check_status} in {result.check_ms:.0f} ms"
                if result.check_status is not None and result.check_ms is not None
                else "",
            )
            if part
        )
        outcome = "connection works" if result.ok else f"failed at {result.stage}"
        detail = f" ({timing})" if timing else ""
        return Banner(result.ok, f"{connector.name}: {outcome}{detail}: {result.message}")

    async def _act(
        self,
        request: AdminRequest,
        action: str,
        run: Callable[[Connector], Awaitable[Banner]],
    ) -> Response:
        refusal = cross_site(request)
        if refusal is not None:
            return page_refusal(refusal, _security_headers(""))
        form = await request.form()
        sent = form.get("admin_token")
        try:
            self.guard(request, sent or None)
        except ProxyError as exc:
            return self._error(exc, Banner(False, f"{action} refused: {exc}"))
        name = request.match_info["name"]
        connector = self.server.broker.connectors.get(name)
        if connector is None:
            message = f"no connector named {name!r}"
            return self._error(NoRoute(message), Banner(False, message))
        banner = await run(connector)
        key = secrets.token_urlsafe(9)
        self.results[key] = banner
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)
        # 303: the browser comes back with a GET, so a reload never repeats the action.
        location = f"/?result={key}#{_anchor(name)}"
        return Response(
            303,
            [("Location", location), ("Content-Type", "text/plain; charset=utf-8")],
            b"303: See Other",
        )

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, banner: Banner | None) -> tuple[str, dict[str, str]]:
        nonce = secrets.token_urlsafe(16)
        body = render(self.server, self.info, self.activity, banner, nonce)
        return body, _security_headers(nonce)

    def _page(self, banner: Banner | None) -> Response:
        body, headers = self._render(banner)
        return Response(
            200,
            [*headers.items(), ("Content-Type", "text/html; charset=utf-8")],
            body.encode(),
        )

    def _error(self, error: ProxyError, banner: Banner) -> Response:
        """The page again, its banner telling ``error``, with the error's status."""
        return page_error(error, *self._render(banner))


def cross_site(request: AdminRequest) -> str | None:
    """Why a state-changing request does not come from this page's own origin, or None.

    Browsers send ``Sec-Fetch-Site``; older ones ``Origin``; ``Referer`` is the last resort.
    A request with none of them is not a browser's (curl): the admin guard alone decides.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return None if site in ("same-origin", "none") else f"a {site} request"
    own = f"{request.scheme}://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None:
        return None if origin == own else "a request from another origin"
    referer = request.headers.get("Referer")
    if referer is not None:
        url = URL(referer)
        if not url.is_absolute() or f"{url.scheme}://{url.raw_authority}" != own:
            return "a request referred by another origin"
    return None


def _security_headers(nonce: str) -> dict[str, str]:
    inline = f"'nonce-{nonce}'" if nonce else "'none'"
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src {inline}; script-src {inline}; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def state_of(status: Mapping[str, Any], refreshing: bool) -> str:
    """What a person needs to know: up, refreshing, paused or down."""
    token_state = status.get("token_state")
    if token_state == "paused":
        return "paused"
    if refreshing:
        return "refreshing"
    return "up" if token_state == "valid" else "down"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


def _anchor(name: str) -> str:
    return "c-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _when(timestamp: Any, now: float) -> str:
    if not isinstance(timestamp, int | float):
        return '<span class="muted">never</span>'
    moment = datetime.fromtimestamp(timestamp, UTC)
    ago = _duration(now - timestamp)
    return (
        f'<time datetime="{_e(moment.isoformat())}">{_e(moment.strftime("%H:%M:%S"))} UTC'
        f'</time> <span class="muted">({_e(ago)} ago)</span>'
    )


def _expiry(status: Mapping[str, Any]) -> str:
    expires_in = status.get("expires_in")
    if not isinstance(expires_in, int | float):
        if status.get("token_state") == "valid":
            return (
                '<span class="expiry">session</span> <span class="muted">(no expiry given)</span>'
            )
        return '<span class="muted">no credential</span>'
    if expires_in <= 0:
        return '<span class="expiry bad">expired</span>'
    return (
        f'<span class="expiry" data-expires-in="{_e(expires_in)}" '
        f'data-expires-at="{_e(status.get("expires_at"))}">'
        f"in {_e(_duration(expires_in))}</span>"
    )


def render_error(status: Mapping[str, Any]) -> str:
    """The last error: its text, cause and hint, whichever ``/connectors`` gives."""
    error = status.get("last_error")
    if not error:
        return '<span class="muted">none</span>'
    message: Any = error
    cause = status.get("last_error_cause") or status.get("last_error_kind")
    hint = status.get("last_error_hint")
    if isinstance(error, Mapping):
        message = error.get("message") or error.get("error") or error.get("detail") or ""
        cause = error.get("cause") or error.get("kind") or cause
        hint = error.get("hint") or error.get("check") or hint
    parts = []
    if cause:
        parts.append(f'<span class="cause">{_e(cause)}</span>')
    if message:
        parts.append(f'<span class="message">{_e(message)}</span>')
    if hint:
        parts.append(f'<span class="hint">Check: {_e(hint)}</span>')
    return "".join(parts)


def _activity(window: Totals | None, minutes: list[Totals | None]) -> str:
    """The counts, then a bar per minute (requests, 5xx in red) as inline SVG: no asset."""
    totals = window or Totals()
    slots = [m or Totals() for m in minutes][-WINDOW_MINUTES:]
    peak = max([m.requests for m in slots] + [1.0])
    step, height, bar = 7, 16, 5
    width = step * WINDOW_MINUTES
    offset = (WINDOW_MINUTES - len(slots)) * step
    # a faint track for every minute, so one minute of data does not look like a stray mark
    rects = [
        f'<rect x="{i * step}" y="{height - 1}" width="{bar}" height="1" fill="#d7dce3"/>'
        for i in range(WINDOW_MINUTES)
    ]
    for i, m in enumerate(slots):
        x = offset + i * step
        h = 1 + round((height - 1) * m.requests / peak)
        e = round((height - 1) * m.errors / peak) if m.errors else 0
        rects.append(f'<rect x="{x}" y="{height - h}" width="{bar}" height="{h}" fill="#94a3b8"/>')
        if e:
            rects.append(
                f'<rect x="{x}" y="{height - e}" width="{bar}" height="{e}" fill="#b91c1c"/>'
            )
    spark = (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="requests per minute">{"".join(rects)}</svg>'
    )
    return (
        f'<span class="count">{totals.requests:g}</span> req · '
        f'<span class="count{" bad" if totals.errors else ""}">{totals.errors:g}</span> 5xx · '
        f'<span class="count">{totals.retries:g}</span> '
        f"{'retry' if totals.retries == 1 else 'retries'} {spark}"
    )


def _card(
    name: str,
    status: dict[str, Any],
    state: str,
    window: Totals | None,
    minutes: list[Totals | None],
    now: float,
    token_field: bool,
) -> str:
    discovered = ""
    if status.get("type") == "ifs_apps10":
        discovered = (
            "<dt>Operations</dt><dd>"
            f'<a class="link" href="/connectors/{_e(URL.build(path=name).raw_path)}/openapi">'
            "discovered (OpenAPI)</a></dd>"
        )
    action = f"/page/connectors/{_e(URL.build(path=name).raw_path)}"
    token = (
        '<input type="password" name="admin_token" placeholder="admin token" '
        'autocomplete="off" aria-label="admin token">'
        if token_field
        else ""
    )
    tls = "" if status.get("tls_verify", True) else ' <span class="warn">TLS not verified</span>'
    return f"""
<article class="card {state}" id="{_e(_anchor(name))}" data-connector="{_e(name)}">
 <header><h2>{_e(name)}</h2><span class="state" data-state="{state}">{state}</span></header>
 <p class="where"><span class="type">{_e(status.get("type", ""))}</span>
  <code>{_e(status.get("route", ""))}</code> →
  <code>{_e(status.get("upstream_host", ""))}</code>{tls}</p>
 <dl>
  <dt>Credential</dt><dd class="expires">{_expiry(status)}</dd>
  <dt>Last refresh</dt><dd class="refreshed">{_when(status.get("last_refresh"), now)}</dd>
  <dt>Last {WINDOW_MINUTES} min</dt><dd class="activity">{_activity(window, minutes)}</dd>
  <dt>Last error</dt><dd class="error">{render_error(status)}</dd>
  {discovered}
 </dl>
 <form method="post" class="actions">{token}
  <button type="submit" formaction="{action}/refresh" name="do" value="refresh">
   Refresh credential</button>
  <button type="submit" formaction="{action}/test" name="do" value="test">
   Test connection</button>
 </form>
</article>"""


def render(
    server: Served,
    info: ConnectorInfo,
    activity: Activity,
    banner: Banner | None,
    nonce: str,
) -> str:
    """The whole page. Every value passes through ``html.escape``."""
    broker = server.broker
    now = time.time()
    ready, _ = broker.readiness()
    store = broker.store_status()
    window, minutes = activity.recent()
    token_field = broker.config.admin_token is not None
    cards = []
    states: list[str] = []
    for name, connector in broker.connectors.items():
        status = info(connector)
        state = state_of(status, connector.tokens.refreshing)
        states.append(state)
        cards.append(
            _card(
                name,
                status,
                state,
                window.get(name),
                [m.get(name) for m in minutes],
                now,
                token_field,
            )
        )
    store_kind = _e(store.get("type") or "none")
    role = store.get("role")
    store_text = store_kind + (f" ({_e(role)})" if role else "")
    store_ok = bool(store.get("up"))
    store_error = (
        ""
        if store_ok or not store.get("last_error")
        else (f' <span class="muted">{_e(store["last_error"])}</span>')
    )
    up = sum(1 for s in states if s == "up")
    readiness = "draining" if broker.draining else ("ready" if ready else "not ready")
    banner_html = ""
    if banner is not None:
        kind = "ok" if banner.ok else "fail"
        banner_html = f'<p class="banner {kind}" role="status">{_e(banner.text)}</p>'
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<link rel="icon" href="data:,">
<title>erp-broker · {_e(readiness)}</title>
<noscript><meta http-equiv="refresh" content="{RELOAD_SECONDS}; url=/"></noscript>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body>
<header class="top">
 <h1>erp-broker</h1>
 <span class="pill {"good" if ready else "bad"}" id="readiness">{_e(readiness)}</span>
 <dl class="facts">
  <div><dt>version</dt><dd id="version">{_e(__version__)}</dd></div>
  <div><dt>uptime</dt><dd id="uptime">{_e(_duration(now - broker.started_at))}</dd></div>
  <div><dt>store</dt><dd id="store">{store_text} ·
   <span class="{"good" if store_ok else "bad"}">{"up" if store_ok else "down"}</span>{store_error}
  </dd></div>
  <div><dt>connectors</dt><dd>{up} of {len(states)} up</dd></div>
 </dl>
</header>
{banner_html}
<main>{"".join(cards)}
</main>
<footer>JSON: <a href="/connectors">/connectors</a> · <a href="/readyz">/readyz</a> ·
 <a href="/metrics">/metrics</a> · this page reloads every {RELOAD_SECONDS} s</footer>
<script nonce="{nonce}">{_SCRIPT}</script>
</body>
</html>
"""


# The countdown ticks between reloads; a reload waits while someone types the admin token.
_SCRIPT = f"""
const t0 = Date.now(), fmt = s => s >= 3600
  ? `${{Math.floor(s / 3600)}}h ${{Math.floor(s % 3600 / 60)}}m`
  : s >= 60 ? `${{Math.floor(s / 60)}}m ${{s % 60}}s` : `${{s}}s`;
setInterval(() => {{ for (const e of document.querySelectorAll('[data-expires-in]')) {{
  const s = Math.floor(e.dataset.expiresIn - (Date.now() - t0) / 1000);
  e.textContent = s > 0 ? 'in ' + fmt(s) : 'expired'; }} }}, 1000);
setInterval(() => {{ if (![...document.querySelectorAll('input')].some(i => i.value))
  location.replace('/'); }}, {RELOAD_SECONDS * 1000});
"""

_CSS = """
:root{--bg:#f5f6f8;--card:#fff;--ink:#1d2330;--muted:#6b7280;--line:#e3e6eb;
--up:#15803d;--refreshing:#2563eb;--paused:#b45309;--down:#b91c1c;color-scheme:light}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--ink)}
.top{display:flex;flex-wrap:wrap;align-items:center;gap:.5rem 1rem;padding:1rem 1.25rem;
background:#1d2330;color:#fff}
.top h1{margin:0;font-size:1.25rem;letter-spacing:.02em}
.facts{display:flex;flex-wrap:wrap;gap:.25rem 1.5rem;margin:0 0 0 auto}
.facts div{display:flex;gap:.4rem}.facts dt{color:#aab2c0}.facts dd{margin:0}
.facts .good{color:#86efac}.facts .bad{color:#fca5a5}
.pill{padding:.15rem .6rem;border-radius:999px;font-weight:600;font-size:.85rem}
.pill.good{background:#dcfce7;color:#14532d}.pill.bad{background:#fee2e2;color:#7f1d1d}
.banner{margin:1rem 1.25rem 0;padding:.7rem 1rem;border-radius:8px;border:1px solid;
overflow-wrap:anywhere}
.banner.ok{background:#ecfdf5;border-color:#86efac}.banner.fail{background:#fef2f2;border-color:#fca5a5}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(22rem,1fr));gap:1rem;
padding:1rem 1.25rem}
.card{background:var(--card);border:1px solid var(--line);border-left:6px solid var(--c);
border-radius:10px;padding:.9rem 1rem;min-width:0}
.card.up{--c:var(--up)}.card.refreshing{--c:var(--refreshing)}
.card.paused{--c:var(--paused)}.card.down{--c:var(--down)}
.card header{display:flex;align-items:center;justify-content:space-between;gap:.5rem}
.card h2{margin:0;font-size:1.15rem;overflow-wrap:anywhere}
.state{background:var(--c);color:#fff;border-radius:999px;padding:.1rem .65rem;font-size:.8rem;
font-weight:700;text-transform:uppercase;letter-spacing:.05em}
.where{margin:.3rem 0 .6rem;color:var(--muted);overflow-wrap:anywhere}
.type{font-weight:600;color:var(--ink);margin-right:.35rem}
code{font:.85em ui-monospace,SFMono-Regular,Menlo,monospace;background:#f1f3f6;
padding:.05rem .3rem;border-radius:4px}
.warn{color:var(--paused);font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.35rem .9rem;margin:0}
.card dt{color:var(--muted)}.card dd{margin:0;min-width:0;overflow-wrap:anywhere}
.expiry{font-variant-numeric:tabular-nums;font-weight:600}.bad{color:var(--down)}
.muted{color:var(--muted)}.count{font-weight:600;font-variant-numeric:tabular-nums}
.spark{vertical-align:-2px;margin-left:.4rem}
.cause{display:inline-block;background:#fff7ed;color:var(--paused);border:1px solid #fed7aa;
border-radius:4px;padding:0 .35rem;margin-right:.35rem;font-size:.85em;font-weight:600}
.message{white-space:pre-wrap}.hint{display:block;color:var(--muted);margin-top:.2rem}
.actions{display:flex;flex-wrap:wrap;align-items:center;gap:.5rem;margin-top:.8rem}
.actions input{flex:1 1 8rem;min-width:0;padding:.4rem .5rem;border:1px solid var(--line);
border-radius:6px;font:inherit}
button{font:inherit;padding:.4rem .8rem;border-radius:6px;border:1px solid #c7ccd5;
background:#fff;cursor:pointer}button:hover{background:#f1f3f6}
.link{color:var(--refreshing)}
footer{padding:0 1.25rem 1.5rem;color:var(--muted);font-size:.85rem}
footer a{color:inherit}
@media (max-width:600px){main{grid-template-columns:1fr;padding:.75rem}
.facts{margin:0}.top{padding:.8rem}}
"""
