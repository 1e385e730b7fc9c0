"""Coordination within one process: the :class:`~broker.types.Coordinator` of a broker that
shares nothing with other replicas (its Redis twin: :class:`broker.stores.redis.RedisCoordinator`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from .types import Clock


class LocalCoordinator:
    """Coordination within one process: nothing to share beyond what the manager holds."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, float] = {}
        self._budgets: dict[str, list[float]] = {}
        self._login_states: dict[str, bytes] = {}

    @contextlib.asynccontextmanager
    async def _no_lock(self) -> Any:
        yield

    def refresh_lock(self, key: str) -> Any:
        return self._no_lock()

    async def wait_window(self, key: str) -> float:
        return max(0.0, self._windows.get(key, 0.0) - self._clock())

    def window_open(self, key: str) -> bool:
        """Fast path of :meth:`wait_window`: True when no window holds ``key`` now."""
        until = self._windows.get(key)
        return until is None or until <= self._clock()

    async def set_window(self, key: str, until: float) -> None:
        self._windows[key] = max(self._windows.get(key, 0.0), until)

    async def login_state(self, key: str) -> bytes | None:
        return self._login_states.get(key)

    async def set_login_state(self, key: str, value: bytes | None, ttl: float) -> None:
        if value is None:
            self._login_states.pop(key, None)
        else:
            self._login_states[key] = value

    async def take_budget(self, key: str, requests: int, per_seconds: float) -> float:
        now = self._clock()
        stamps = self._budgets.setdefault(key, [])
        while stamps and stamps[0] <= now - per_seconds:
            stamps.pop(0)
        if len(stamps) < requests:
            stamps.append(now)
            return 0.0
        return max(0.001, stamps[len(stamps) - requests] + per_seconds - now)
