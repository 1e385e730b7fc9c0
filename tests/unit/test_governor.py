"""LoginGovernor: login spacing after rejections, suspension, resumption."""

from __future__ import annotations

from broker.coordinator import LocalCoordinator
from broker.governor import LoginBackoffPolicy, LoginGovernor


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def governor(clock: Clock, coordinator: LocalCoordinator | None = None) -> LoginGovernor:
    coordinator = coordinator or LocalCoordinator(clock)
    return LoginGovernor("ifs:abc", LoginBackoffPolicy(30, 120, 4), coordinator, clock)


class TestLoginGovernor:
    async def test_spacing_doubles_to_max_then_suspends(self) -> None:
        """30, 60, 120, then suspended at the fourth rejection in a row."""
        clock = Clock()
        gov = governor(clock)
        waits = []
        for _ in range(3):
            state = await gov.rejected("invalid_credentials")
            waits.append(gov.blocked_for())
            clock.now = state.not_before
        assert waits == [30, 60, 120] and gov.blocked_for() == 0
        await gov.rejected("invalid_credentials")
        assert gov.state.suspended and gov.blocked_for() == float("inf")

    async def test_shared_through_the_coordinator(self) -> None:
        """A second governor on the same coordinator (another replica) sees the spacing."""
        clock = Clock()
        coordinator = LocalCoordinator(clock)
        first, second = governor(clock, coordinator), governor(clock, coordinator)
        await first.rejected("account_disabled")
        assert second.blocked_for() == 0
        await second.sync()
        assert second.blocked_for() == 30 and second.state.cause == "account_disabled"
        await first.succeeded()
        await second.sync()
        assert second.blocked_for() == 0

    async def test_resume_keeps_the_minimum_spacing(self) -> None:
        """An operator's resume ends a suspension, but not within `initial` of a failure."""
        clock = Clock()
        gov = governor(clock)
        for _ in range(4):
            await gov.rejected("invalid_credentials")
        clock.now += 10
        assert await gov.resume() == 20
        assert not gov.state.suspended and gov.state.failures == 0
        clock.now += 20
        assert gov.blocked_for() == 0

    async def test_new_credentials_only_wait_out_the_quick_login_guard(self) -> None:
        """Changed credentials are tried at once, but never within 2 s of the last failure."""
        clock = Clock()
        old = governor(clock)
        for _ in range(4):
            await old.rejected("invalid_credentials")
        new = governor(clock)
        new.carry_over(old)
        assert new.blocked_for() == 2.0 and not new.state.suspended
