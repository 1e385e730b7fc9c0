"""ERP answers that mean more than their status: ``auth_failure`` and ``retry_on`` matchers.

A PSO Gateway answers a dead session with 400 ``AUTHENTICATION_FAILED`` (or, older ones, a 200
whose JSON says ``Code: 401``); IFS answers a 500 ``MI_MODIFIED_ERROR`` that is meant to be
retried once. The proxy's send loop asks :meth:`ResponseRules.verdict` about an answer whose
status some matcher names, and treats the answer as a rejected credential (``AUTH``) or a
transient error (``TRANSIENT``). A body is inspected only when it is small (<= 64 KiB, with a
Content-Length), not compressed, and the answer has one; the body read for that is handed back
so the answer still reaches the app untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import orjson
from multidict import CIMultiDictProxy

from .config import ResponseMatcher
from .flow import answer_has_body
from .retry import AUTH, IDEMPOTENT_METHODS, TRANSIENT

#: Largest body a matcher reads (bigger ones are never a short error message).
BODY_LIMIT = 64 * 1024


class Answer(Protocol):
    """What the matchers need of an ERP answer (``broker.http1.Response``)."""

    status: int
    headers: CIMultiDictProxy[str]
    content_length: int | None

    async def read(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Rule:
    verdict: str
    status: int
    body: bytes | None
    json_code: int | None
    any_method: bool

    @property
    def needs_body(self) -> bool:
        return self.body is not None or self.json_code is not None

    def matches(self, method: str, data: bytes | None) -> bool:
        if self.verdict == TRANSIENT and not self.any_method and method not in IDEMPOTENT_METHODS:
            return False
        if not self.needs_body:
            return True
        if data is None:
            return False
        if self.body is not None and self.body not in data:
            return False
        return self.json_code is None or _json_code(data) == self.json_code


def _json_code(data: bytes) -> int | None:
    """The top-level ``Code`` of a JSON object body (a number or a numeric string)."""
    if b'"Code"' not in data:
        return None  # nearly every answer: no parse
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    code = parsed.get("Code") if isinstance(parsed, dict) else None
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return None


def _readable(answer: Answer, method: str) -> bool:
    length = answer.content_length
    encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    return (
        length is not None
        and length <= BODY_LIMIT
        and encoding in ("", "identity")
        and answer_has_body(method, answer.status)
    )


class ResponseRules:
    """A connector's ``auth_failure`` and ``retry_on`` matchers, indexed by status."""

    def __init__(
        self, auth_failure: Iterable[ResponseMatcher], retry_on: Iterable[ResponseMatcher]
    ) -> None:
        rules = [_rule(AUTH, m) for m in auth_failure] + [_rule(TRANSIENT, m) for m in retry_on]
        self._by_status: dict[int, list[Rule]] = {}
        for rule in rules:
            self._by_status.setdefault(rule.status, []).append(rule)
        #: Statuses some matcher names: every other answer passes without a look.
        self.statuses = frozenset(self._by_status)

    async def verdict(self, answer: Answer, method: str) -> tuple[str | None, bytes | None]:
        """``AUTH``, ``TRANSIENT`` or None for ``answer``, and its body if it was read."""
        rules = self._by_status.get(answer.status, ())
        data: bytes | None = None
        if any(r.needs_body for r in rules) and _readable(answer, method):
            data = await answer.read()
        for rule in rules:
            if rule.matches(method, data):
                return rule.verdict, data
        return None, data


def _rule(verdict: str, matcher: ResponseMatcher) -> Rule:
    body = matcher.body.encode() if matcher.body is not None else None
    return Rule(verdict, matcher.status, body, matcher.json_code, matcher.any_method)
