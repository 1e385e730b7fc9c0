"""The lockout-safe login governor: after a credential rejection, logins are spaced and, after
``max_failures`` rejections in a row, paused until the credentials change or an operator asks.

Identity providers lock a service account that fails too often (Keycloak's brute-force
detection: two failures less than a second apart lock it for a minute, 30 lock it for up to 15
minutes or for good, and while locked even the right password is refused). The broker must
never be the cause, so one rule holds for every connector: after a rejection the next login
waits ``initial`` seconds, then twice that, up to ``max``; never two failed logins within
``initial``. The state lives in the fleet's coordinator (Redis when the store is shared), read
and written while the fleet's refresh lock is held, so all replicas together make at most one
failed login per interval.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import orjson

from .types import Clock, Coordinator


@dataclass(frozen=True, slots=True)
class LoginBackoffPolicy:
    """``login_backoff`` as the governor needs it."""

    initial: float = 30.0
    max: float = 900.0
    max_failures: int = 5


@dataclass(frozen=True, slots=True)
class LoginState:
    """Rejections in a row for one service account; times are Unix seconds."""

    failures: int = 0
    last_failure: float = 0.0
    step: float = 0.0
    not_before: float = 0.0
    suspended: bool = False
    cause: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> LoginState:
        raw = orjson.loads(data)
        return cls(
            failures=int(raw.get("failures", 0)),
            last_failure=float(raw.get("last_failure", 0.0)),
            step=float(raw.get("step", 0.0)),
            not_before=float(raw.get("not_before", 0.0)),
            suspended=bool(raw.get("suspended", False)),
            cause=raw.get("cause"),
        )


CLEAR = LoginState()
#: Seconds between a failed login and the first login with changed credentials.
QUICK_LOGIN_GUARD = 2.0


class LoginGovernor:
    """One service account's login spacing, shared through the coordinator."""

    def __init__(
        self,
        key: str,
        policy: LoginBackoffPolicy,
        coordinator: Coordinator,
        clock: Clock = time.time,
    ) -> None:
        self.key = key
        self.policy = policy
        self._coordinator = coordinator
        self._clock = clock
        #: The last state this replica saw (read from the fleet inside the refresh lock).
        self.state = CLEAR

    # -- what the token manager asks ------------------------------------------------------

    def blocked_for(self) -> float:
        """Seconds until a login may be tried (inf while suspended, 0 when it may now)."""
        if self.state.suspended:
            return float("inf")
        return max(0.0, self.state.not_before - self._clock())

    async def sync(self) -> LoginState:
        """Read the fleet's state (call it with the refresh lock held, before a login)."""
        raw = await self._coordinator.login_state(self.key)
        if raw is None:
            self.state = CLEAR  # cleared by a replica whose login worked (or expired)
        else:
            try:
                self.state = LoginState.from_json(raw)
            except (ValueError, TypeError, orjson.JSONDecodeError):
                pass  # unreadable: keep what this replica knows
        return self.state

    async def rejected(self, cause: str) -> LoginState:
        """A login was rejected: space the next one, or suspend after max_failures."""
        state = self.state
        now = self._clock()
        step = (
            self.policy.initial
            if state.failures == 0 or state.step == 0.0
            else min(self.policy.max, state.step * 2)
        )
        failures = state.failures + 1
        self.state = LoginState(
            failures=failures,
            last_failure=now,
            step=step,
            not_before=now + step,
            suspended=failures >= self.policy.max_failures,
            cause=cause,
        )
        await self._publish()
        return self.state

    async def succeeded(self) -> None:
        if self.state != CLEAR:
            self.state = CLEAR
            await self._publish()

    async def resume(self) -> float:
        """An operator asked for a login: end a suspension and the count of failures. The
        minimum spacing still holds; returns seconds until a login may be tried."""
        state = self.state
        not_before = state.last_failure + self.policy.initial if state.last_failure else 0.0
        self.state = LoginState(last_failure=state.last_failure, not_before=not_before)
        await self._publish()
        return max(0.0, not_before - self._clock())

    def carry_over(self, previous: LoginGovernor) -> None:
        """New credentials: tried at once with a fresh count — but never within
        ``QUICK_LOGIN_GUARD`` seconds of the last failure (Keycloak locks a user after two
        failures less than a second apart, whatever the password was)."""
        last = max(previous.state.last_failure, self.state.last_failure)
        if last:
            guard = min(self.policy.initial, QUICK_LOGIN_GUARD)
            self.state = LoginState(last_failure=last, not_before=last + guard)

    async def _publish(self) -> None:
        value = None if self.state == CLEAR else self.state.to_json()
        ttl = max(3600.0, self.policy.max * 4)
        await self._coordinator.set_login_state(self.key, value, ttl)
