"""Memory given back after a burst: the trim loop's decisions, and the real malloc_trim."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from broker import memory


class TestGiveBackMemory:
    async def test_trims_once_grown_and_idle_then_not_again(self) -> None:
        """A trim happens when RSS grew past the threshold while idle; the level after the
        trim is the new floor, so the same RSS does not trim again."""
        levels = iter([100, 100, 200, 120, 120, 120, 120])  # floor, tick, tick+trim, ...
        trims: list[int] = []
        done = asyncio.Event()

        def rss() -> int:
            level = next(levels, 120)
            if level == 120 and trims:
                done.set()
            return level

        task = asyncio.create_task(
            memory.give_back_memory(
                lambda: True, interval=0, growth=50, trim=lambda: trims.append(1), rss=rss
            )
        )
        await asyncio.wait_for(done.wait(), 5)
        for _ in range(5):
            await asyncio.sleep(0)  # more ticks at the new floor
        task.cancel()
        assert trims == [1]

    async def test_never_trims_while_requests_are_in_flight(self) -> None:
        """Grown RSS is left alone while busy (a trim would stall the requests)."""
        ticks = 0
        trims: list[int] = []
        done = asyncio.Event()

        def rss() -> int:
            nonlocal ticks
            ticks += 1
            if ticks > 20:
                done.set()
            return 100 if ticks == 1 else 1000

        task = asyncio.create_task(
            memory.give_back_memory(
                lambda: False, interval=0, growth=50, trim=lambda: trims.append(1), rss=rss
            )
        )
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        assert trims == []

    async def test_without_malloc_trim_it_returns_at_once(self) -> None:
        """On a C library without malloc_trim the loop does nothing and ends."""
        await asyncio.wait_for(memory.give_back_memory(lambda: True, trim=None), 1)

    def test_rss_is_read(self) -> None:
        assert memory.rss_bytes() > 1024 * 1024


@pytest.mark.skipif(memory.malloc_trim is None, reason="this C library has no malloc_trim")
def test_malloc_trim_gives_a_fragmented_heap_back() -> None:
    """The pattern of proxying large bodies: 64 KiB buffers with a small buffer that lives on
    between them. Freed, glibc keeps them all resident; malloc_trim returns them."""
    script = textwrap.dedent(
        """
        from broker import memory
        MIB = 1024 * 1024
        base = memory.rss_bytes()
        keep, chunks = [], []
        for i in range(1600):  # 100 MiB
            chunks.append(bytearray(64 * 1024))
            if i % 10 == 0:
                keep.append(bytearray(600))  # above pymalloc's limit: from the same heap
        del chunks
        held = memory.rss_bytes()
        memory.malloc_trim()
        print((held - base) // MIB, (memory.rss_bytes() - base) // MIB)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    held, after = map(int, out.stdout.split())
    assert held >= 80, f"the heap was not fragmented as expected: {held} MiB held"
    assert after <= 20, f"malloc_trim gave back too little: {after} MiB still held"
