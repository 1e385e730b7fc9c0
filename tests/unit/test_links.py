"""The link rewriter alone: headers, JSON bodies split anywhere, escapes, compression."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.http1 import UpstreamProtocolError
from broker.links import JsonLinks, LinkRewriter, is_json

BASE = "https://erp.example.com:8443/ion/TENANT"
BROKER = "http://127.0.0.1:8080/ifs"


def rewriter(base: str = BASE, route: str = "/ifs/") -> LinkRewriter:
    return LinkRewriter(base, route, bodies=True)


def body_links(encoding: str | None = None, base: str = BASE) -> JsonLinks:
    headers = [("Content-Type", "application/json")]
    if encoding:
        headers.append(("Content-Encoding", encoding))
    links = rewriter(base).answer("127.0.0.1:8080", headers, has_body=True)
    assert links is not None
    return links


def split_run(links: JsonLinks, data: bytes, cuts: list[int]) -> bytes:
    out = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += [bytes(p) for p in links.feed(data[last:cut])]
        last = cut
    return b"".join(out) + links.end()


def reference(value: Any, base: str = BASE, new: str = BROKER) -> Any:
    """Every string (keys too) that starts with ``base`` (scheme and host in any case) and then
    /, ?, # or ends: rewritten."""
    if isinstance(value, str):
        authority = len(base.split("/", 3)[2]) + len("https://")
        head = value[: len(base)]
        if (
            head[:authority].lower() == base[:authority].lower()
            and head[authority:] == base[authority:]
            and (len(value) == len(base) or value[len(base)] in "/?#")
        ):
            return new + value[len(base) :]
        return value
    if isinstance(value, list):
        return [reference(v, base, new) for v in value]
    if isinstance(value, dict):
        return {reference(k, base, new): reference(v, base, new) for k, v in value.items()}
    return value


def encode(value: Any, rng: random.Random) -> str:
    """JSON with strings escaped as a server might: ``\\/``, ``\\u00XX`` for any character."""
    if isinstance(value, str):
        out = ['"']
        for char in value:
            roll = rng.random()
            if char in '"\\':
                out.append("\\" + char)
            elif char == "/" and roll < 0.3:
                out.append("\\/")
            elif ord(char) < 0x20 or (roll < 0.1 and ord(char) < 0x10000):
                out.append(f"\\u{ord(char):04{'x' if rng.random() < 0.5 else 'X'}}")
            else:
                out.append(char)
        return "".join(out) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(encode(v, rng) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode(k, rng)}: {encode(v, rng)}" for k, v in value.items()) + "}"
    return json.dumps(value)


link_strings = st.sampled_from(
    [
        BASE,
        BASE + "/",
        BASE + "/Set?$skiptoken=5",
        BASE + "#frag",
        BASE + "?x=1",
        BASE + "x",  # not a link of this base: another path segment
        BASE + "2/more",
        "HTTPS://ERP.EXAMPLE.COM:8443/ion/TENANT/case",  # scheme and host ignore case
        "https://erp.example.com:8443/ion/tenant/Set",  # the path does not
        'he said "' + BASE + '/quoted"',
        "\\" + BASE,
        "\\\\" + BASE + "/x",
        BASE[:-1],
        "",
        "h",
    ]
)
strings = st.one_of(link_strings, st.text(max_size=12), link_strings.map(lambda s: s + "\\"))
documents = st.recursive(
    st.one_of(strings, st.integers(), st.none(), st.booleans()),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(strings, children, max_size=5)
    ),
    max_leaves=25,
)


class TestHeaders:
    def test_location_rewritten_to_the_host_the_app_used(self) -> None:
        """Location and Content-Location under the base lead to the broker, with the Host sent."""
        links = rewriter("https://erp.example.com")
        for host in ("127.0.0.1:8080", "10.1.2.3:8080", "erp-broker.ns.svc:80", "[::1]:8080"):
            headers = [
                ("Location", "https://erp.example.com/main/Set(Id='1')"),
                ("Content-Location", "https://ERP.example.com:443/main/x?y=1"),
                ("Link", "https://erp.example.com/main/other"),
            ]
            assert links.answer(host, headers, has_body=False) is None
            assert headers == [
                ("Location", f"http://{host}/ifs/main/Set(Id='1')"),
                ("Content-Location", f"http://{host}/ifs/main/x?y=1"),
                ("Link", "https://erp.example.com/main/other"),
            ]

    def test_other_urls_untouched(self) -> None:
        """Relative, other hosts, look-alike hosts and other paths stay as they came."""
        links = rewriter("https://erp.example.com/base")
        values = [
            "/elsewhere",
            "https://other.example.com/base/x",
            "https://erp.example.com.evil.org/base/x",
            "https://erp.example.com/basement",
            "http://erp.example.com/base/x",
        ]
        headers = [("Location", v) for v in values]
        links.answer("127.0.0.1:8080", headers, has_body=True)
        assert [v for _, v in headers] == values

    def test_bad_or_missing_host_gives_a_path(self) -> None:
        """Without a usable Host the link becomes the broker's path (a relative reference)."""
        links = rewriter("https://erp.example.com")
        for host in (None, 'evil"host', "a/b", ""):
            headers = [("Location", "https://erp.example.com/x")]
            links.answer(host, headers, has_body=False)
            assert headers == [("Location", "/ifs/x")]

    def test_json_detection(self) -> None:
        """application/json, +json and OData's parameters are JSON; others are not."""
        assert is_json("application/json;odata.metadata=minimal;IEEE754Compatible=false")
        assert is_json("Application/JSON; charset=utf-8")
        assert is_json("application/problem+json")
        assert not is_json("text/json") and not is_json("application/xml") and not is_json(None)

    def test_body_framing_headers_dropped_only_when_rewritten(self) -> None:
        """A rewritten body loses Content-Length and Content-Encoding; others keep them."""
        links = rewriter()
        json_headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", "10"),
            ("Content-Encoding", "gzip"),
        ]
        assert links.answer("h:1", json_headers, has_body=True) is not None
        assert json_headers == [("Content-Type", "application/json")]
        for headers in (
            [("Content-Type", "text/plain"), ("Content-Length", "10")],
            [("Content-Type", "application/json"), ("Content-Encoding", "br")],
            [("Content-Type", "application/json"), ("Content-Encoding", "gzip, gzip")],
        ):
            before = list(headers)
            assert links.answer("h:1", headers, has_body=True) is None
            assert headers == before
        off = LinkRewriter(BASE, "/ifs/", bodies=False)
        assert off.answer("h:1", [("Content-Type", "application/json")], has_body=True) is None


class TestJsonBody:
    def test_odata_links_rewritten(self) -> None:
        """Every string starting with the base changes; the rest is byte for byte."""
        base = "https://erp.example.com"
        svc = base + "/main/ifsapplications/projection/v1/CustomerHandling.svc"
        body = (
            '{"@odata.context":"'
            + svc
            + '/$metadata#CustomerInfoSet","value":[{"@odata.id":"'
            + svc.replace("/", "\\/")
            + '/CustomerInfoSet(\'1\')","Note":"see '
            + base
            + '"}],'
            '"@odata.nextLink":"' + svc + '/CustomerInfoSet?$skiptoken=2"}'
        ).encode()
        broker = "http://127.0.0.1:8080/ifs"
        want = (
            '{"@odata.context":"' + broker + "/main/ifsapplications/projection/v1/"
            'CustomerHandling.svc/$metadata#CustomerInfoSet","value":[{"@odata.id":"'
            + broker
            + "\\/main\\/ifsapplications\\/projection\\/v1\\/CustomerHandling.svc/CustomerInfoSet('1')"
            '","Note":"see '
            + base
            + '"}],"@odata.nextLink":"'
            + broker
            + '/main/ifsapplications/projection/v1/CustomerHandling.svc/CustomerInfoSet?$skiptoken=2"}'
        ).encode()
        assert body_links(base=base).whole(body) == want

    def test_every_one_byte_split(self) -> None:
        """Fed one byte at a time, or split at any single position, the result is the same."""
        body = json.dumps({"a": BASE + "/x", "b": [BASE, "\\" + BASE], "c": BASE.upper()}).encode()
        whole = body_links().whole(body)
        assert b"127.0.0.1:8080" in whole
        assert split_run(body_links(), body, list(range(len(body)))) == whole
        for cut in range(len(body)):
            assert split_run(body_links(), body, [cut]) == whole

    def test_long_backslash_runs_across_pieces(self) -> None:
        """A quote after an odd run of backslashes from earlier pieces is escaped: no link."""
        for run in (1, 2, 99, 100):
            data = ('["' + "\\" * (2 * run) + '", "' + BASE + '/a"]').encode()
            whole = body_links().whole(data)
            assert json.loads(whole) == ["\\" * run, BROKER + "/a"]
            assert split_run(body_links(), data, list(range(0, len(data), 7))) == whole

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(documents, st.integers(0, 2**32), st.lists(st.integers(0, 4000), max_size=40))
    def test_random_documents_and_splits(self, document: Any, seed: int, cuts: list[int]) -> None:
        """Any document, any escaping, any split: the rewrite equals the reference rewrite."""
        data = encode(document, random.Random(seed)).encode()
        assert json.loads(data) == document
        cuts = [c % (len(data) + 1) for c in cuts]
        out = split_run(body_links(), data, cuts)
        assert json.loads(out) == reference(document)
        assert out == body_links().whole(data)

    @settings(max_examples=100, deadline=None)
    @given(documents, st.lists(st.integers(0, 4000), max_size=10))
    def test_random_documents_as_json_dumps_writes_them(
        self, document: Any, cuts: list[int]
    ) -> None:
        """Without escapes the bulk path (bytes.replace) does the work: same result."""
        data = json.dumps(document, ensure_ascii=False).encode()
        cuts = [c % (len(data) + 1) for c in cuts]
        out = split_run(body_links(), data, cuts)
        assert json.loads(out) == reference(document)
        assert out == body_links().whole(data)

    def test_bulk_path_and_careful_path_agree(self) -> None:
        """A plain OData page takes the bulk path; one odd spelling sends the piece to the
        careful search; both give the reference rewrite."""
        rows = [{"@odata.id": f"{BASE}/Set({n})", "x": "https://other/"} for n in range(50)]
        for odd in ("", BASE.upper() + "/odd", BASE + "x"):
            document = {"value": rows, "odd": odd}
            data = json.dumps(document).encode()
            links = body_links()
            assert json.loads(links.whole(data)) == reference(document)
            bulk = links._bulk(data, data.lower())
            assert (bulk is not None) is (odd == ""), odd

    @settings(max_examples=40, deadline=None)
    @given(documents, st.integers(0, 2**32), st.sampled_from(["gzip", "deflate", "raw"]))
    def test_compressed_documents(self, document: Any, seed: int, kind: str) -> None:
        """gzip, zlib-wrapped and raw deflate bodies come out inflated and rewritten."""
        rng = random.Random(seed)
        data = encode(document, rng).encode()
        if kind == "gzip":
            packed = gzip.compress(data)
        elif kind == "deflate":
            packed = zlib.compress(data)
        else:
            raw = zlib.compressobj(wbits=-15)
            packed = raw.compress(data) + raw.flush()
        links = body_links("deflate" if kind != "gzip" else "gzip")
        cuts = sorted(rng.randrange(len(packed) + 1) for _ in range(5))
        assert json.loads(split_run(links, packed, cuts)) == reference(document)

    def test_gzip_members_and_bombs_stream_in_steps(self) -> None:
        """Two gzip members are one body; a small body that inflates hugely comes in steps."""
        parts = [b'{"a": "' + BASE.encode() + b'/1",', b' "b": 2}']
        links = body_links("gzip")
        out = b"".join(bytes(p) for p in links.feed(b"".join(gzip.compress(p) for p in parts)))
        assert json.loads(out + links.end()) == {"a": BROKER + "/1", "b": 2}
        bomb = gzip.compress(b'["' + b" " * (16 * 1024 * 1024) + b'"]')
        assert len(bomb) < 32 * 1024
        biggest = max(len(p) for p in body_links("gzip").feed(bomb))
        assert biggest <= 64 * 1024 + 512

    def test_corrupt_gzip_is_an_upstream_error(self) -> None:
        """A body that does not inflate is the ERP's protocol error."""
        with pytest.raises(UpstreamProtocolError):
            list(body_links("gzip").feed(b"\x1f\x8b\x08\x00garbage-garbage-garbage"))
