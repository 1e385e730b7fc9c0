"""The listener's reading of a request against h11's (the oracle): hypothesis generates requests
with their framing headers in every spelling (Content-Length and Transfer-Encoding repeated,
combined, padded, signed, listed), obs-fold, bare LF, methods, versions and Host variants, each
followed by a pipelined ``GET /end``; the broker's listener (over loopback) and h11 read the
same bytes.

The property: the requests the listener hands its handler are a prefix of those h11 reads,
with the same method, target and body — the listener may refuse more than h11 (be stricter),
never accept what h11 refuses nor frame a body differently (no request smuggling). Legitimate
differences, where the listener is stricter than h11:

- methods llhttp does not know (``FOO``, lower case ``get``): 501; h11 takes any token;
- versions other than 1.0 and 1.1 (``HTTP/2.0``, ``HTTP/0.9``): 505; h11 takes ``HTTP/2.0``;
- ``Host`` values that are not a host (``a b``, ``a/b``): 400; h11 checks only that there is
  exactly one on HTTP/1.1;
- ``Transfer-Encoding`` on HTTP/1.0: 400; h11 frames the body as chunked;
- llhttp refuses some whitespace and list forms h11 accepts (``Content-Length: 5, 5``).

Requests that are well-formed for both are also checked the other way: the listener accepts
them exactly as h11 does.
"""

from __future__ import annotations

import asyncio

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.server import Request, Response

from .test_server import LIMIT, serving

#: The request that follows each generated one.
END = b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
BODY = b"hello"

Event = tuple[str, str, bytes]

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "MERGE", "OPTIONS", "PROPFIND", "FOO", "get"]
VERSIONS = ["1.1", "1.1", "1.1", "1.0", "2.0", "0.9"]
HOSTS: list[list[bytes]] = [
    [b"x"],
    [b"erp.example:8080"],
    [b"[::1]:80"],
    [],
    [b"a", b"b"],
    [b"x", b"x"],
    [b""],
    [b"a b"],
    [b"a/b"],
]
LENGTHS = ["5", " 5", "5 ", "05", "+5", "5, 5", "5,5", "-5", "0x5", "", "6", "0"]
CODINGS = [
    "chunked",
    "CHUNKED",
    "Chunked ",
    "gzip, chunked",
    "chunked, gzip",
    "xchunked",
    "identity",
    "chunked,",
    " chunked",
]
NAMES_CL = ["Content-Length", "content-length", "CONTENT-LENGTH", "Content-Length "]
NAMES_TE = ["Transfer-Encoding", "transfer-encoding", "Transfer-Encoding "]


@st.composite
def framing(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Zero to three framing headers, in any spelling and order."""
    fields = []
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            fields.append((draw(st.sampled_from(NAMES_CL)), draw(st.sampled_from(LENGTHS))))
        else:
            fields.append((draw(st.sampled_from(NAMES_TE)), draw(st.sampled_from(CODINGS))))
    return fields


def body_for(fields: list[tuple[str, str]]) -> bytes:
    """The body a sender that believed its first framing header would send."""
    for name, value in fields:
        if name.strip().lower() == "transfer-encoding":
            return b"5\r\nhello\r\n0\r\n\r\n"
        if name.strip().lower() == "content-length":
            try:
                return b"h" * int(value.strip(), 10)
            except ValueError:
                return BODY
    return b""


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    version = draw(st.sampled_from(VERSIONS))
    lines = [f"{method} /r?q=1 HTTP/{version}".encode()]
    lines += [b"Host: " + host for host in draw(st.sampled_from(HOSTS))]
    fields = draw(framing())
    lines += [f"{name}: {value}".encode() for name, value in fields]
    if draw(st.integers(0, 9)) == 0:
        lines.insert(2, b" folded")  # obs-fold
    if draw(st.integers(0, 9)) == 0:
        lines.insert(1, b"X-Space : 1")
    eol = b"\n" if draw(st.integers(0, 9)) == 0 else b"\r\n"
    return eol.join(lines) + eol + eol + body_for(fields)


@st.composite
def clean_requests(draw: st.DrawFn) -> bytes:
    """Well-formed for both readers."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "MERGE"]))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    head = f"{method} /r HTTP/{version}\r\nHost: {draw(st.sampled_from(['x', 'e.example:1']))}\r\n"
    kind = draw(
        st.sampled_from(["none", "length", "chunked"] if version == "1.1" else ["none", "length"])
    )
    body = draw(st.binary(max_size=40))
    # No keep-alive on HTTP/1.0: h11 closes after every HTTP/1.0 request (the listener keeps
    # one that asks; test_server covers it).
    if kind == "length":
        name = draw(st.sampled_from(NAMES_CL[:3]))
        return f"{head}{name}: {len(body)}\r\n\r\n".encode() + body
    if kind == "chunked":
        name = draw(st.sampled_from(NAMES_TE[:2]))
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return f"{head}{name}: chunked\r\n\r\n".encode() + chunk + b"0\r\n\r\n"
    return f"{head}\r\n".encode()


def h11_reading(data: bytes) -> list[Event]:
    """The requests h11 reads from ``data``, answering each, until it refuses or needs more."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    events: list[Event] = []
    current: list[object] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return events
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return events
        if isinstance(event, h11.Request):
            current = [event.method.decode(), event.target.decode(), b""]
        elif isinstance(event, h11.Data):
            current[2] = bytes(current[2]) + bytes(event.data)  # type: ignore[arg-type]
        elif isinstance(event, h11.EndOfMessage):
            events.append((str(current[0]), str(current[1]), bytes(current[2])))  # type: ignore[arg-type]
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return events
            conn.start_next_cycle()


async def broker_reading(data: bytes) -> list[Event]:
    """The requests the listener hands its handler for ``data`` (sent in one write)."""
    events: list[Event] = []

    async def handle(request: Request) -> Response:
        events.append((request.method, request.raw_path, await request.read()))
        return Response(200)

    async with asyncio.timeout(LIMIT), serving(handle) as served:
        client = await served.connect()
        await client.send(data)
        try:
            async with asyncio.timeout(1.0):  # a reading that waits for more: stop there
                await client.rest()
        except TimeoutError:
            pass
    return events


#: The same test runs on asyncio's loop and on uvloop (tests/io/conftest.py): two executors of
#: one deterministic property.
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)


class TestAgainstH11:
    @SETTINGS
    @given(requests())
    async def test_never_laxer_than_h11(self, request_bytes: bytes) -> None:
        """What the listener hands its handler, h11 reads too, with the same method, target
        and body; the pipelined request after it is never read differently."""
        data = request_bytes + END
        ours = await broker_reading(data)
        theirs = h11_reading(data)
        assert ours == theirs[: len(ours)], (data, ours, theirs)

    @SETTINGS
    @given(clean_requests())
    async def test_well_formed_read_alike(self, request_bytes: bytes) -> None:
        """A well-formed request (and on HTTP/1.1 the one after it) read exactly as h11
        reads it."""
        data = request_bytes + END
        ours = await broker_reading(data)
        assert len(ours) == (2 if b" HTTP/1.1\r\n" in request_bytes else 1)
        assert ours == h11_reading(data)
