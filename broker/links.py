"""Links never lead around the broker: the ERP's absolute URLs in answers, rewritten.

An answer may carry the ERP's own URL: ``Location`` after a create, ``Content-Location``, and in
OData's JSON ``@odata.nextLink``, ``@odata.context``, ``@odata.id`` and the like. An app that
follows one would talk to the ERP without the broker's credential. :class:`LinkRewriter` (one per
connector) rewrites every such URL that starts with the connector's upstream base URL to the
broker's URL for the connector's route, built from the ``Host`` the app sent (so it works behind
``127.0.0.1``, a pod IP or a Service name), like nginx's ``proxy_redirect default``.

Headers always; JSON bodies when the connector's ``rewrite_links`` is on. A JSON body is
rewritten as it streams (:class:`JsonLinks`): constant memory, correct however the body is split
into reads, and respecting JSON's escaping (``\\/`` and ``\\u00XX`` for any character of the
base). The match is one compiled regular expression per connector, so the bytes are searched
in C; Python runs once per link found, not once per byte. A gzip or deflate JSON body is
decompressed (bounded, piece by piece), rewritten and sent uncompressed. Everything else passes
untouched.

Why a JSON string is found without parsing the JSON: in valid JSON a ``"`` that is not escaped
and is followed by ``h`` (or an escape) opens a string; a closing quote is followed only by
whitespace, ``,``, ``:``, ``]`` or ``}``. So an unescaped quote followed by the base URL is
the start of a string value (or key) that starts with the base URL.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import Protocol
from urllib.parse import urlsplit

from .http1 import UpstreamProtocolError

#: Decompressed bytes produced per step: a compressed answer is never inflated whole.
INFLATE_STEP = 64 * 1024
#: ``Host`` values trusted into a URL (and into JSON): host or [IPv6], optional port.
_HOST = re.compile(r"(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})
#: What may follow the base URL in a link: a path, a query, a fragment, or the string's end.
_BOUNDARY_TEXT = "(?=[/?#]|$)"
#: The same, for the plain spellings' check (lower-cased text).
_BOUNDARIES = (b"/", b"?", b"#", b'"', b"\\/", b"\\u0023", b"\\u002f", b"\\u003f")
_PLAIN_BOUNDARIES = (b"/", b"?", b"#", b'"')
_BOUNDARY_JSON = rb'(?=[/?#"]|\\/|\\u00(?:2[3Ff]|3[Ff]))'
# What LinkRewriter.answer does with a header, by its lower-cased name.
_LOCATION, _TYPE, _ENCODING, _STALE, _ETAG = range(5)
_HEADER_KINDS = {
    "location": _LOCATION,
    "content-location": _LOCATION,
    "content-type": _TYPE,
    "content-encoding": _ENCODING,
    "content-length": _STALE,
    "content-md5": _STALE,
    "etag": _ETAG,
}
#: Their lengths: any other name is passed over without being lower-cased.
_KIND_LENGTHS = frozenset(len(name) for name in _HEADER_KINDS)


def is_json(content_type: str | None) -> bool:
    """``application/json``, ``application/<x>+json``, with any parameters (OData's
    ``odata.metadata=minimal`` among them)."""
    if not content_type:
        return False
    # An ERP sends the same few values on every answer: each decided once (bounded).
    known = _JSON_TYPES.get(content_type)
    if known is None:
        media = content_type.partition(";")[0].strip().lower()
        known = media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        )
        if len(_JSON_TYPES) >= 64:
            _JSON_TYPES.clear()
        _JSON_TYPES[content_type] = known
    return known


_JSON_TYPES: dict[str, bool] = {}


def _base_variants(base: str) -> list[tuple[str, str]]:
    """(authority part, path) of each spelling of ``base``: with and without its default port."""
    parts = urlsplit(base)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    path = parts.path.rstrip("/")
    default = _DEFAULT_PORTS.get(scheme)
    spellings = [f"{scheme}://{parts.netloc}"]
    if port is None and default is not None:
        spellings.append(f"{scheme}://{host}:{default}")
    elif port == default:
        spellings.append(f"{scheme}://{host}")
    return [(authority, path) for authority in dict.fromkeys(spellings)]


def _json_char(char: str, fold_case: bool) -> bytes:
    """A regex (bytes) for one character of the base URL as JSON may write it."""
    options = {char, char.swapcase()} if fold_case and char.isalpha() else {char}
    alternatives: list[bytes] = []
    for option in sorted(options):
        code = ord(option)
        alternatives.append(re.escape(option.encode()))
        hex_digits = f"{code:04x}"
        alternatives.append(
            rb"\\u"
            + b"".join(
                b"[%s%s]" % (d.encode(), d.upper().encode()) if d.isalpha() else d.encode()
                for d in hex_digits
            )
        )
    if char == "/":
        alternatives.append(rb"\\/")
    return b"(?:" + b"|".join(alternatives) + b")"


def _json_pattern(base: str) -> tuple[re.Pattern[bytes], int]:
    """The regex for ``"`` + base URL in JSON, and the longest text it can match."""
    spellings: list[bytes] = []
    longest = 0
    for authority, path in _base_variants(base):
        spellings.append(
            b"".join(_json_char(c, True) for c in authority)
            + b"".join(_json_char(c, False) for c in path)
        )
        longest = max(longest, 6 * (len(authority) + len(path)))
    pattern = b'"(?:' + b"|".join(spellings) + b")" + _BOUNDARY_JSON
    # the quote, the base (6 bytes per character at most), the boundary's look-ahead
    return re.compile(pattern), 1 + longest + 6


def _text_pattern(base: str) -> re.Pattern[str]:
    spellings = [
        "(?i:" + re.escape(authority) + ")" + re.escape(path)
        for authority, path in _base_variants(base)
    ]
    return re.compile("(?:" + "|".join(spellings) + ")" + _BOUNDARY_TEXT)


class LinkRewriter:
    """One connector's rewriting: its upstream base URL, its route, whether bodies count."""

    def __init__(self, upstream_base: str, route: str, *, bodies: bool) -> None:
        self.upstream_base = upstream_base.rstrip("/")
        #: The route without its trailing slash: ``/ifs``.
        self.route = "/" + route.strip("/") if route.strip("/") else ""
        self.bodies = bodies
        self._bases: dict[str | None, str] = {}
        self._replacements: dict[str, tuple[bytes, bool]] = {}
        self._text = _text_pattern(self.upstream_base)
        self._json, self._window = _json_pattern(self.upstream_base)
        scheme = urlsplit(self.upstream_base).scheme.lower().encode()
        #: Where a link can start, in the body lower-cased: a quote, the scheme, a colon.
        self._needle = b'"' + scheme + b":"
        #: A quote and the scheme's first letter in either case: a body with neither (and
        #: no escape) has no link, known without lower-casing it.
        self._starts = (b'"' + scheme[:1].lower(), b'"' + scheme[:1].upper())
        #: Spellings that escape a character of the scheme: a piece with one is searched
        #: with the whole pattern (slower; servers that write these are rare).
        self._exotic = tuple(b'"' + scheme[:i] + b"\\u" for i in range(len(scheme) + 1))
        #: The spellings without ``\u`` escapes (all slashes plain, or all ``\/``): quote and
        #: authority lower-cased, the length of those, the path as it must be.
        self._forms: list[tuple[bytes, int, bytes]] = []
        for authority, path in _base_variants(self.upstream_base):
            for slash in (b"/", b"\\/"):
                head = b'"' + authority.lower().encode().replace(b"/", slash)
                tail = path.encode().replace(b"/", slash)
                self._forms.append((head + tail.lower(), len(head), tail))
        self._shortest = min(len(form) for form, _, _ in self._forms)
        self._heads = tuple(form for form, _, _ in self._forms)
        # The bulk path (:meth:`JsonLinks._bulk`): links in their plain spelling, replaced
        # with bytes.replace, once nothing in a piece can hide one or fake one.
        longest = max(len(form) for form, _, _ in self._forms)
        self._suspect = re.compile(self._needle + rb'[^"\\]{0,%d}\\' % (longest + 8))
        self._escaped_needle = b"\\" + self._needle
        self._plain_heads = [head for head in self._heads if b"\\" not in head]
        #: The quote and authority of each spelling, when the base has a path.
        self._authorities = (
            [form[:authority] for form, authority, _ in self._forms if b"\\" not in form]
            if urlsplit(self.upstream_base).path.strip("/")
            else None
        )
        self._spelled = [
            form[:authority] + path for form, authority, path in self._forms if b"\\" not in form
        ]

    def broker_base(self, host: str | None) -> str:
        """The broker's URL for the route as the app reached it: ``http://<Host>/<route>``;
        only the path when the app sent no usable ``Host`` (a relative reference)."""
        # An app sends the same Host on every request: checked and built once (bounded).
        base = self._bases.get(host)
        if base is None:
            base = (
                self.route
                if host is None or not _HOST.fullmatch(host)
                else f"http://{host}{self.route}"
            )
            if len(self._bases) >= 64:
                self._bases.clear()
            self._bases[host] = base
        return base

    def replacement(self, broker_base: str) -> tuple[bytes, bool]:
        """What a link's quote and base become in a JSON body, and whether that is unsafe: a
        spelling of the base, or the start of one (the broker on the ERP's own host and port),
        which the next bytes.replace could replace again. Made once per broker URL."""
        known = self._replacements.get(broker_base)
        if known is None:
            replacement = b'"' + broker_base.encode("ascii")
            unsafe = any(
                replacement.startswith(s) or s.startswith(replacement) for s in self._spelled
            )
            if len(self._replacements) >= 64:
                self._replacements.clear()
            known = self._replacements[broker_base] = (replacement, unsafe)
        return known

    def rewrite_url(self, value: str, broker_base: str) -> str:
        """``value`` with the upstream base replaced, if it starts with it."""
        match = self._text.match(value)
        if match is None:
            return value
        return broker_base + value[match.end() :]

    def answer(
        self, host: str | None, headers: list[tuple[str, str]], *, has_body: bool
    ) -> JsonLinks | None:
        """Rewrite ``Location`` and ``Content-Location`` in ``headers`` (in place); when the
        body is to be rewritten too, drop its framing and coding headers from ``headers`` and
        return the body's rewriter, else None (the body passes as it came)."""
        broker_base = self.broker_base(host)
        content_type: str | None = None
        encodings: list[str] = []
        # One pass over the headers; what a rewritten body must lose is noted by position.
        stale: list[int] = []
        kinds, lengths = _HEADER_KINDS, _KIND_LENGTHS
        for i, (name, value) in enumerate(headers):
            if len(name) not in lengths or (kind := kinds.get(name.lower())) is None:
                continue
            if kind == _LOCATION:
                headers[i] = (name, self.rewrite_url(value, broker_base))
            elif kind == _TYPE:
                content_type = value
            elif kind == _ENCODING:
                encodings += [e.strip().lower() for e in value.split(",") if e.strip()]
                stale.append(i)
            elif kind == _STALE or not value.startswith("W/"):  # a strong ETag is stale too
                stale.append(i)
        if not (self.bodies and has_body and is_json(content_type)):
            return None
        if encodings:
            encodings = [e for e in encodings if e != "identity"]
            if len(encodings) > 1 or (encodings and encodings[0] not in _ENCODINGS):
                return None  # a coding the broker cannot undo: the body passes untouched
        for i in reversed(stale):
            del headers[i]
        return JsonLinks(self, broker_base, encodings[0] if encodings else None)


class JsonLinks:
    """One JSON body's rewrite, piece by piece: :meth:`feed` each piece, then :meth:`end`."""

    __slots__ = (
        "_backslashes",
        "_broker_base",
        "_carry",
        "_exotic",
        "_forms",
        "_heads",
        "_inflater",
        "_links",
        "_needle",
        "_pattern",
        "_ready",
        "_replacement",
        "_shortest",
        "_unsafe",
        "_window",
    )

    def __init__(self, links: LinkRewriter, broker_base: str, encoding: str | None) -> None:
        # Most JSON answers hold no link (see whole): the rest is set up on the first piece.
        self._links = links
        self._broker_base = broker_base
        self._needle = links._needle
        self._ready = False
        #: Bytes held back: they may be the start of a link the next piece completes.
        self._carry = b""
        #: Whether the bytes given out so far end in an odd run of backslashes.
        self._backslashes = False
        self._inflater: _Inflater | None = _Inflater(encoding) if encoding else None

    def _prepare(self) -> None:
        links = self._links
        self._pattern = links._json
        self._window = links._window
        self._exotic = links._exotic
        self._forms = links._forms
        self._heads = links._heads
        self._shortest = links._shortest
        self._replacement, self._unsafe = links.replacement(self._broker_base)
        self._ready = True

    @property
    def compressed(self) -> bool:
        return self._inflater is not None

    def feed(self, chunk: bytes | memoryview) -> Iterator[bytes | memoryview]:
        """The rewritten bytes that can go out after ``chunk`` (maybe none)."""
        if not self._ready:
            self._prepare()
        if self._inflater is None:
            out = self._rewrite(chunk)
            if out:
                yield out
            return
        for piece in self._inflater.inflate(chunk):
            out = self._rewrite(piece)
            if out:
                yield out

    def end(self) -> bytes:
        """Whatever was held back; the body is complete."""
        if not self._ready:
            self._prepare()
        if self._inflater is not None:
            rest = b"".join(self._rewrite(p) for p in self._inflater.flush())
        else:
            rest = b""
        data, self._carry = self._carry, b""
        return rest + self._replace(data, len(data))

    def whole(self, body: bytes) -> bytes:
        """A whole body, rewritten."""
        if self._inflater is None:
            # Every link starts as a JSON string: a quote, then the scheme and a colon in some
            # case, or an escape (``\u``). A body with neither holds none (most small answers).
            # Single bytes are searched first (memchr): a link has a slash, plain or escaped.
            if b"\\" not in body:
                if b"/" not in body:
                    return body
                lower, upper = self._links._starts
                if (lower not in body and upper not in body) or self._needle not in body.lower():
                    return body
            elif b"\\u" not in body and self._needle not in body.lower():
                return body
        return b"".join(self.feed(body)) + self.end()

    async def stream(
        self, chunks: AsyncIterable[bytes | memoryview]
    ) -> AsyncIterator[bytes | memoryview]:
        async for chunk in chunks:
            for out in self.feed(chunk):
                yield out
        last = self.end()
        if last:
            yield last

    def _rewrite(self, chunk: bytes | memoryview) -> bytes | memoryview:
        carry = self._carry
        data: bytes | memoryview = carry + chunk if carry else chunk
        size = len(data)
        # A link may start in the last ``window`` bytes and end in the next piece: hold back
        # from the last quote there (a link that starts at an earlier quote ends before it:
        # no spelling of the base URL has a quote in it).
        low = max(0, size - self._window)
        tail = data[low:] if isinstance(data, bytes) else bytes(data[low:])
        quote = tail.rfind(b'"')
        cut = size if quote < 0 else low + quote
        self._carry = bytes(data[cut:]) if cut < size else b""
        return self._replace(data, cut)

    def _replace(self, data: bytes | memoryview, cut: int) -> bytes | memoryview:
        """``data[:cut]`` with its links rewritten (``data`` holds every byte a link that
        starts before ``cut`` can span)."""
        whole = bytes(data)
        lowered = whole.lower()  # scheme and host are matched in any case
        if b"\\u" in lowered and any(spelling in lowered for spelling in self._exotic):
            search = self._searcher()
        elif self._needle in lowered:
            bulk = self._bulk(whole[:cut], lowered[:cut])
            if bulk is not None:
                self._backslashes = _ends_in_odd_run(bulk, self._backslashes)
                return bulk
            search = self._finder(lowered)
        else:
            out = data if cut == len(data) else data[:cut]  # the usual piece: no link
            self._backslashes = _ends_in_odd_run(out, self._backslashes)
            return out
        pieces: list[bytes] = []
        start = 0
        while (span := search(whole, start)) is not None:
            begin, end = span
            if begin >= cut:
                break
            if self._escaped(whole, begin):
                pieces.append(whole[start : begin + 1])
                start = begin + 1
                continue
            pieces.append(whole[start:begin])
            pieces.append(self._replacement)
            start = end
        pieces.append(whole[start:cut])
        result = b"".join(pieces)
        self._backslashes = _ends_in_odd_run(result, self._backslashes)
        return result

    def _bulk(self, piece: bytes, lowered: bytes) -> bytes | None:
        """``piece`` rewritten by bytes.replace (C speed), or None when the careful search is
        needed: an escape that may hide a link (``\\u``, ``\\/``), an escaped quote before
        one, a spelling in another case, or a base URL followed by something else.

        Without ``\\u`` in the piece, JSON can escape no character of an authority; so a
        link the counts below miss has ``:\\/`` after its scheme or ``\\/`` in the base's
        path, and either shows as a difference of two counts."""
        links = self._links
        needle = links._needle
        if (
            (b"\\u" in lowered and links._suspect.search(lowered) is not None)
            or lowered.count(needle) != lowered.count(needle + b"//")
            or links._escaped_needle in lowered
            or (self._backslashes and piece.startswith(b'"'))
        ):
            return None
        starts = sum(lowered.count(head) for head in links._plain_heads)
        if links._authorities is not None and starts != sum(
            lowered.count(head) for head in links._authorities
        ):
            return None  # the base's authority with another path, or its path escaped
        plans = []
        for spelled in links._spelled:
            if spelled in piece:
                for boundary in _PLAIN_BOUNDARIES:
                    found = piece.count(spelled + boundary)
                    if found:
                        plans.append((spelled + boundary, found, boundary))
        if sum(found for _, found, _ in plans) != starts or self._unsafe:
            return None
        for text, _, boundary in plans:
            piece = piece.replace(text, self._replacement + boundary)
        return piece

    def _searcher(self) -> Callable[[bytes, int], tuple[int, int] | None]:
        """Any spelling: the whole pattern, searched."""
        search = self._pattern.search

        def spans(data: bytes, pos: int) -> tuple[int, int] | None:
            found = search(data, pos)
            return None if found is None else found.span()

        return spans

    def _finder(self, lowered: bytes) -> Callable[[bytes, int], tuple[int, int] | None]:
        """The usual case: ``bytes.find`` for where a link may start and ``startswith`` for
        the plain spellings, all in C; the pattern only where an escape may hide a link (a
        spelling that differs from the plain ones has a backslash where it first does)."""
        find, starts, needle = lowered.find, lowered.startswith, self._needle
        match_at, forms, heads, shortest = (
            self._pattern.match,
            self._forms,
            self._heads,
            self._shortest,
        )

        def spans(data: bytes, pos: int) -> tuple[int, int] | None:
            while (at := find(needle, pos)) >= 0:
                if starts(heads, at):
                    for form, authority, path in forms:
                        end = at + len(form)
                        if (
                            starts(form, at)
                            and data.startswith(path, at + authority)
                            and starts(_BOUNDARIES, end)
                        ):
                            return at, end
                if find(b"\\", at, at + shortest) >= 0:
                    if (found := match_at(data, at)) is not None:
                        return found.span()
                pos = at + 1
            return None

        return spans

    def _escaped(self, data: bytes | memoryview, quote: int) -> bool:
        """Whether the quote at ``data[quote]`` follows an odd run of backslashes."""
        i = quote - 1
        while i >= 0 and data[i] == 0x5C:
            i -= 1
        odd = bool((quote - 1 - i) % 2)
        if i < 0:
            odd ^= self._backslashes  # the run goes on into the bytes given out before
        return odd


def _ends_in_odd_run(data: bytes | memoryview, before: bool) -> bool:
    """Whether ``data``, after bytes that ended in an odd run of backslashes (``before``)
    or not, ends in an odd run of backslashes."""
    if not data:
        return before
    tail = bytes(data[-64:])
    run = len(tail) - len(tail.rstrip(b"\\"))
    if run == len(tail) and len(data) > len(tail):
        whole = bytes(data)
        run = len(whole) - len(whole.rstrip(b"\\"))
    odd = bool(run % 2)
    return odd ^ before if run == len(data) else odd


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...

    def flush(self) -> bytes: ...


class _Inflater:
    """gzip (members one after another) or deflate (zlib-wrapped or raw), inflated in bounded
    steps: a small compressed answer that inflates to gigabytes still streams."""

    __slots__ = ("_encoding", "_ended", "_pending", "_zlib")

    def __init__(self, encoding: str) -> None:
        self._encoding = "deflate" if encoding == "deflate" else "gzip"
        self._zlib: _Decompressor | None = None
        self._pending = b""
        self._ended = False

    def _new(self, first: bytes) -> _Decompressor:
        if self._encoding == "deflate":
            # RFC 9110 says zlib-wrapped; some servers send raw deflate.
            wrapped = (first[0] & 0x0F) == 8 and ((first[0] << 8) | first[1]) % 31 == 0
            return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return zlib.decompressobj(16 + zlib.MAX_WBITS)

    def inflate(self, chunk: bytes | memoryview) -> Iterator[bytes]:
        try:
            yield from self._inflate(chunk)
        except zlib.error as exc:
            raise UpstreamProtocolError(f"the {self._encoding} body is corrupt ({exc})") from None

    def _inflate(self, chunk: bytes | memoryview) -> Iterator[bytes]:
        data = self._pending + bytes(chunk)
        self._pending = b""
        while data and not self._ended:
            if self._zlib is None:
                if len(data) < 2:
                    self._pending = data  # too little to tell zlib from raw deflate
                    return
                self._zlib = self._new(data)
            inflater = self._zlib
            out = inflater.decompress(data, INFLATE_STEP)
            while True:
                if out:
                    yield out
                if not inflater.unconsumed_tail or inflater.eof:
                    break
                out = inflater.decompress(inflater.unconsumed_tail, INFLATE_STEP)
            if not inflater.eof:
                return
            data = inflater.unused_data
            self._zlib = None
            # gzip: another member may follow; deflate: one stream, the rest is ignored
            self._ended = self._encoding == "deflate"

    def flush(self) -> Iterator[bytes]:
        if self._zlib is not None:
            try:
                out = self._zlib.flush()
            except zlib.error as exc:
                raise UpstreamProtocolError(
                    f"the {self._encoding} body is corrupt ({exc})"
                ) from None
            if out:
                yield out
