"""Retry policy and ``Retry-After`` parsing: pure functions, no I/O."""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass

#: Methods that may be sent again after a 504: the ERP may have processed the first one.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

RATE_LIMITED = "rate_limited"
GATEWAY_TIMEOUT = "gateway_timeout"
AUTH = "auth"
#: A pooled connection the ERP had closed while idle: it never saw the request.
STALE_CONNECTION = "stale_connection"
#: An ERP-specific transient error named by a connector's ``retry_on`` matchers.
TRANSIENT = "transient"
#: Every ``reason`` of ``erp_broker_retries_total``: each retry the send loop makes is one.
RETRY_REASONS = (AUTH, RATE_LIMITED, GATEWAY_TIMEOUT, STALE_CONNECTION, TRANSIENT)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), or None.

    ``now`` is the current Unix time, against which an HTTP-date is measured. A date in the
    past means "now" (0). A value that is neither form is ignored (None).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # not in the RFC, but some gateways send "1.5"
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2**attempt))
    return (rng or random).uniform(0, ceiling)


@dataclass(slots=True)
class RetryBudget:
    """What one request may still spend on retries and waits, made when it first needs one.

    At most ``max_retries`` retries; no single retry's wait over ``max_wait``; and every second
    the request actually waits -- out a rate-limit window (its own 429's or one already open
    when it came) or a backoff after a 504 or a ``retry_on`` match -- is charged, so that
    ``max_total`` bounds the time it waits in all.
    """

    max_retries: int
    max_wait: float
    max_total: float
    retries: int = 0
    waited: float = 0.0

    def allows(self, wait: float) -> bool:
        """True if one more retry after ``wait`` seconds stays within the budget."""
        return (
            self.retries < self.max_retries
            and wait <= self.max_wait
            and self.waited + wait <= self.max_total
        )

    def fits(self, wait: float) -> bool:
        """True if waiting ``wait`` more seconds (for a window, not a retry) stays within
        ``max_total``."""
        return self.waited + wait <= self.max_total

    @property
    def left(self) -> float:
        """Seconds of waiting the request has left."""
        return max(0.0, self.max_total - self.waited)

    def retry(self) -> None:
        """One retry more; its wait is charged when it is waited (:meth:`charge`)."""
        self.retries += 1

    def charge(self, seconds: float) -> None:
        """Seconds the request actually waited."""
        self.waited += seconds


#: Token requests (``TokenManager``): after a transient failure of the token endpoint
#: (unreachable, too slow, a 5xx) the next one waits 1, 2, 4 … seconds with full jitter, at
#: least ``TOKEN_BACKOFF_MIN`` and at most ``TOKEN_BACKOFF_MAX``; that request is a
#: ``transient`` retry. A refresh the ERP rejects is followed by one login: an ``auth`` retry.
TOKEN_BACKOFF_BASE = 1.0
TOKEN_BACKOFF_MIN = 0.5
TOKEN_BACKOFF_MAX = 60.0


def token_retry_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds before the next token request after ``failures`` transient failures in a row
    (0 for the first failure: 1 s at most)."""
    return max(
        TOKEN_BACKOFF_MIN, backoff_delay(failures, TOKEN_BACKOFF_BASE, TOKEN_BACKOFF_MAX, rng)
    )


def should_retry(status: int, method: str) -> str | None:
    """The retry reason for an ERP answer, or None: 429 always, 504 only when idempotent."""
    if status == 429:
        return RATE_LIMITED
    if status == 504 and method in IDEMPOTENT_METHODS:
        return GATEWAY_TIMEOUT
    return None
