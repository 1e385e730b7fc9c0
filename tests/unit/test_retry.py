"""Retry-After parsing and the retry budget."""

from __future__ import annotations

import email.utils
import random

from broker.retry import RetryBudget, backoff_delay, parse_retry_after, should_retry


class TestRetryAfter:
    def test_seconds(self) -> None:
        """delta-seconds form."""
        assert parse_retry_after("2", now=0) == 2.0

    def test_http_date(self) -> None:
        """HTTP-date form, measured from now; a past date means now."""
        now = 1_700_000_000.0
        date = email.utils.formatdate(now + 5, usegmt=True)
        assert parse_retry_after(date, now=now) == 5.0
        assert parse_retry_after(email.utils.formatdate(now - 50, usegmt=True), now=now) == 0.0

    def test_garbage_is_ignored(self) -> None:
        """Unparseable values fall back to backoff (None)."""
        for value in (None, "", "soon", "-3", "Mon, 99 Foo"):
            assert parse_retry_after(value, now=0) is None


class TestBackoff:
    def test_full_jitter_is_capped(self) -> None:
        """Delays stay within [0, min(cap, base*2**n)]."""
        rng = random.Random(1)
        for attempt in range(10):
            delay = backoff_delay(attempt, 0.5, 30, rng)
            assert 0 <= delay <= min(30, 0.5 * 2**attempt)


class TestBudget:
    def test_count_single_and_total_caps(self) -> None:
        """At most max_retries, no wait over max_wait, no more than max_total in all."""
        budget = RetryBudget(max_retries=3, max_wait=30, max_total=60)
        assert not budget.allows(31)
        budget.retry()
        budget.charge(30)
        assert budget.allows(30)
        budget.retry()
        budget.charge(29)
        assert not budget.allows(2)
        budget.retry()
        budget.charge(1)
        assert not budget.allows(0)


class TestShouldRetry:
    def test_429_every_method_504_idempotent_only(self) -> None:
        """A POST is never retried after a 504; 429 is retried for every method."""
        assert should_retry(429, "POST") == "rate_limited"
        assert should_retry(504, "GET") == "gateway_timeout"
        assert should_retry(504, "PUT") == "gateway_timeout"
        assert should_retry(504, "POST") is None
        assert should_retry(504, "PATCH") is None
        assert should_retry(500, "GET") is None


class TestCharges:
    def test_waits_are_charged_and_bound_the_total(self) -> None:
        """A window's wait is charged without a retry; fits() and allows() see what was charged."""
        budget = RetryBudget(max_retries=3, max_wait=30, max_total=10)
        assert budget.fits(10) and not budget.fits(10.5)
        budget.charge(7)  # a window found open on arrival: no retry spent
        assert budget.retries == 0 and budget.left == 3
        assert budget.fits(3) and not budget.fits(4)
        assert not budget.allows(4)  # its own 429 asking 4 s more: past max_total
        budget.retry()
        assert budget.retries == 1 and budget.waited == 7
        budget.charge(5)
        assert budget.left == 0 and not budget.fits(0.1)


class TestTokenRetryDelay:
    def test_doubles_with_jitter_between_the_floor_and_the_cap(self) -> None:
        """After n transient failures: within [TOKEN_BACKOFF_MIN, min(MAX, 2**n)]."""
        from broker.retry import TOKEN_BACKOFF_MAX, TOKEN_BACKOFF_MIN, token_retry_delay

        rng = random.Random(7)
        for failures in range(12):
            ceiling = max(TOKEN_BACKOFF_MIN, min(TOKEN_BACKOFF_MAX, 2.0**failures))
            for _ in range(20):
                assert TOKEN_BACKOFF_MIN <= token_retry_delay(failures, rng) <= ceiling
        assert max(token_retry_delay(20, rng) for _ in range(50)) > TOKEN_BACKOFF_MAX / 2
