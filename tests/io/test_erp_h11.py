"""Differential test of the ERP client's framing against h11 (issue 12).

Hypothesis writes ERP answers: framing headers in every spelling and case, repeated and
conflicting lengths, whitespace, unknown codings, bodies shorter or longer than announced,
bytes after the answer, interim 1xx answers, answers to HEAD, 204 and 304, bodies delimited
by the ERP closing, and the reads the bytes arrive in. For each, the broker's client
(``broker.http1``, the connection protocol fed those reads) and h11 (a strict, independent
implementation) must reach the same decision: the answer's status and body and whether the
connection may carry another request, or an error, or waiting for more.

Where the two legitimately differ, the broker is the stricter, and the test says so:

- a repeated ``Content-Length`` with one value (``5`` twice, or ``5, 5``): h11 takes it
  (RFC 9110 8.6 allows that), llhttp refuses it; the broker answers 502 rather than trust an
  ERP that cannot say its length once;
- ``Transfer-Encoding: chunked`` beside ``Content-Length``: h11 follows the coding and
  ignores the length (RFC 9112 6.3 rule 3), the broker refuses the answer: RFC 9112 6.1
  calls this a possible smuggling attempt, and a proxy is where smuggling works.

And the broker refuses a malformed line at its first bad byte (llhttp), where h11 may wait
for the line to end: the test accepts the broker's error then only if h11 refuses the same
bytes once the connection is closed. Everything else must agree exactly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import http1
from broker.http1 import (
    MAX_HEAD,
    Pool,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamReadTimeout,
)

#: The client waits this long for bytes that will not come ("incomplete").
WAIT = 0.05
FOREIGN = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nforeign"

Verdict = tuple[Any, ...]


class _Transport:
    """The least of an asyncio transport the connection protocol uses: the bytes of the
    request go nowhere, and the answer's bytes are fed by the test, in the reads it chose."""

    def __init__(self) -> None:
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def broker_reading(method: str, reads: list[bytes], eof: bool) -> Verdict:
    pool = Pool("127.0.0.1", 9, ssl_context=None, limit=1, connect_timeout=WAIT, read_timeout=WAIT)
    conn = http1._Connection(pool, WAIT)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    task = asyncio.create_task(conn.send(method, b"", None, False))
    await asyncio.sleep(0)  # the request is written: the answer is awaited
    for data in reads:
        if conn.closed:
            break  # a closed transport delivers nothing more
        if data:
            conn.data_received(data)
    if eof and not conn.closed:
        conn.eof_received()
        conn.connection_lost(None)
    try:
        response = await task
        body = await response.read()
    except (UpstreamProtocolError, UpstreamClosed):
        return ("error",)
    except UpstreamReadTimeout:
        return ("incomplete",)
    response.release()
    reused = pool.idle_connections == 1
    pool.close()
    return ("answer", response.status, body, reused)


def h11_reading(method: str, data: bytes, eof: bool) -> Verdict:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "erp")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    status = 0
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return ("incomplete",)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return ("error",)
            # InformationalResponse: the answer is still to come
    except h11.RemoteProtocolError:
        return ("error",)
    reusable = conn.their_state is h11.DONE and conn.trailing_data == (b"", False)
    return ("answer", status, body, reusable)


def spellings(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, bytes, bool, list[int], bool]:
    """(method, bytes the ERP sends, whether it closes after, read boundaries, whether the
    answer is one the broker refuses on purpose)."""
    method = draw(st.sampled_from(["GET", "HEAD", "POST"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    body = draw(st.binary(max_size=40))
    headers: list[tuple[str, str]] = []
    stricter = False

    coding = draw(
        st.sampled_from(
            [
                None,
                None,
                "chunked",
                "Chunked",
                " chunked ",
                "CHUNKED",
                "xchunked",
                "chunkedx",
                "gzip, chunked",
                "identity",
                "chunked, chunked",
                "gzip",
            ]
        )
    )
    if coding is not None:
        headers.append((draw(spellings("Transfer-Encoding")), coding))
    n = len(body)
    length_value = draw(
        st.sampled_from(
            [
                None,
                None,
                str(n),
                str(n),
                f"{n} ",
                f" {n}",
                f"{n}\t",
                f"0{n}",
                str(n + 3),
                str(max(0, n - 3)),
                "+5",
                "5a",
                "",
                "-1",
                "dup",
                "dup-other",
                "list",
                "list-other",
            ]
        )
    )
    if length_value is not None:
        name = draw(spellings("Content-Length"))
        if length_value == "dup":
            headers += [(name, str(n)), (name, str(n))]
            stricter = True
        elif length_value == "dup-other":
            headers += [(name, str(n)), (name, str(n + 1))]
        elif length_value == "list":
            headers.append((name, f"{n}, {n}"))
            stricter = True
        elif length_value == "list-other":
            headers.append((name, f"{n}, {n + 1}"))
        else:
            headers.append((name, length_value))
        if coding is not None:
            stricter = True
    connection = draw(st.sampled_from([None, "close", "Close", "keep-alive", "Content-Length"]))
    if connection is not None:
        headers.append((draw(spellings("Connection")), connection))
    headers.append(("X-Other", draw(st.sampled_from(["1", "a b", ""]))))
    draw(st.randoms()).shuffle(headers)

    if coding is not None and draw(st.booleans()):
        # The body sent chunked (whatever the header says), in pieces, maybe with extensions
        # and trailers.
        cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True) if b > a]
        ext = draw(st.sampled_from([b"", b";x=1"]))
        encoded = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces)
        trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
        payload = encoded + b"0\r\n" + trailer + b"\r\n"
    else:
        payload = body

    interim = draw(
        st.lists(
            st.sampled_from(
                [
                    b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                ]
            ),
            max_size=2,
        )
    )
    head = b"%s %d X\r\n" % (version, status) + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in headers
    )
    extra = draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n", b"x", FOREIGN]))
    data = b"".join(interim) + head + b"\r\n" + payload + extra
    eof = draw(st.booleans())
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return method, data, eof, cuts, stricter


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(answers())
async def test_framing_agrees_with_h11(case: tuple[str, bytes, bool, list[int], bool]) -> None:
    method, data, eof, cuts, stricter = case
    reads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    expected = h11_reading(method, data, eof)
    got = await broker_reading(method, reads, eof)
    if stricter:
        # Documented above: the broker refuses what h11 may take.
        assert got == ("error",), (data, eof, expected)
    elif got == ("error",) and expected == ("incomplete",):
        # llhttp refuses a malformed line at its first bad byte; h11 waits for the line's
        # end. Both refuse it: h11 too once the ERP closes.
        assert h11_reading(method, data, True) == ("error",), (data, cuts)
    else:
        assert got == expected, (data, eof, cuts)
