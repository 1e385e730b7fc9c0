"""ResponseRules: which ERP answers are rejected credentials or transient errors."""

from __future__ import annotations

import gzip

from multidict import CIMultiDict, CIMultiDictProxy

from broker.config import IFS_RETRY_ON, PSO_AUTH_FAILURE, ResponseMatcher
from broker.matchers import BODY_LIMIT, ResponseRules


class FakeAnswer:
    def __init__(self, status: int, body: bytes, **headers: str) -> None:
        self.status = status
        self._body = body
        self.reads = 0
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.content_length: int | None = len(body)

    async def read(self) -> bytes:
        self.reads += 1
        return self._body


class TestResponseRules:
    async def test_pso_defaults(self) -> None:
        """400 AUTHENTICATION_FAILED / INVALID_SESSION and a 200 with top-level Code 401 are
        dead sessions; other 400s and 200s are not; the body read is handed back."""
        rules = ResponseRules(PSO_AUTH_FAILURE, ())
        for status, body, expected in [
            (400, b'{"Message":"AUTHENTICATION_FAILED"}', "auth"),
            (400, b'{"Message":"INVALID_SESSION"}', "auth"),
            (400, b'{"Message":"INVALID_INPUT"}', None),
            (200, b'{"Code":401,"Message":"INVALID_SESSION"}', "auth"),
            (200, b'{"Code":"401"}', "auth"),
            (200, b'{"data":{"Code":401}}', None),  # not top level: data, not a dead session
            (200, b'{"text":"Code 401 in a payload"}', None),
        ]:
            answer = FakeAnswer(status, body, **{"Content-Type": "application/json"})
            verdict, data = await rules.verdict(answer, "GET")
            assert (verdict, data) == (expected, body), body
        assert 500 not in rules.statuses

    async def test_big_compressed_or_unsized_bodies_are_not_read(self) -> None:
        """Over 64 KiB, compressed, without Content-Length or for HEAD: no read, no match."""
        rules = ResponseRules(PSO_AUTH_FAILURE, ())
        text = b'{"Message":"AUTHENTICATION_FAILED"}'
        big = FakeAnswer(400, text + b" " * BODY_LIMIT)
        zipped = FakeAnswer(400, gzip.compress(text), **{"Content-Encoding": "gzip"})
        unsized = FakeAnswer(400, text)
        unsized.content_length = None
        for answer, method in ((big, "GET"), (zipped, "GET"), (unsized, "GET")):
            assert await rules.verdict(answer, method) == (None, None)
            assert answer.reads == 0
        head = FakeAnswer(400, text)
        assert (await rules.verdict(head, "HEAD"))[0] is None and head.reads == 0

    async def test_retry_on_methods(self) -> None:
        """retry_on matches idempotent methods only, unless any_method."""
        body = b'{"error":{"code":"MI_MODIFIED_ERROR"}}'
        plain = ResponseRules((), (ResponseMatcher(status=500, body="MI_MODIFIED_ERROR"),))
        assert (await plain.verdict(FakeAnswer(500, body), "GET"))[0] == "transient"
        assert (await plain.verdict(FakeAnswer(500, body), "POST"))[0] is None
        ifs = ResponseRules((), IFS_RETRY_ON)
        assert (await ifs.verdict(FakeAnswer(500, body), "POST"))[0] == "transient"
        assert (await ifs.verdict(FakeAnswer(500, b'{"error":"x"}'), "GET"))[0] is None

    async def test_status_only_matcher_needs_no_body(self) -> None:
        """{status: 403} matches every 403 without reading it."""
        rules = ResponseRules((ResponseMatcher(status=403),), ())
        answer = FakeAnswer(403, b"x" * (BODY_LIMIT + 1))
        assert await rules.verdict(answer, "POST") == ("auth", None) and answer.reads == 0
