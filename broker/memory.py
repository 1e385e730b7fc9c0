"""Giving memory back to the system after a burst of large answers.

A sidecar's memory is paid once per pod, so RSS after a burst matters as much as RSS at
idle. glibc keeps memory that was freed inside its heap whenever a small allocation that
lives on sits above it: proxying large bodies in 64 KiB pieces, with a few small buffers
allocated between them, leaves the whole burst's worth of pages resident after every piece
was freed (measured: 100 MiB held of 100 MiB freed). ``malloc_trim(0)`` hands those free pages
back (``madvise``), wherever they are in the heap; it costs a few milliseconds, so the broker
calls it only when no request is in flight and RSS has grown since the last time.

On a C library without ``malloc_trim`` (musl, macOS) nothing is done. ``ctypes`` is imported
only when a trim is first due (issue 20: an idle broker does not carry it).
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Any

#: RSS growth over the last trimmed level that is worth a trim.
GROWTH = 4 * 1024 * 1024
#: How often the broker looks.
INTERVAL = 10.0

_PAGE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def find_trim() -> Callable[[], object] | None:
    """``malloc_trim(0)``, or None where the C library has none (looked up once)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def __getattr__(name: str) -> Any:
    # ``memory.malloc_trim``: ``malloc_trim(0)``, or None where the C library has none.
    if name == "malloc_trim":
        return find_trim()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``trim``'s default: the C library's ``malloc_trim``, looked up when a trim is first due.
LIBC = object()


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


async def give_back_memory(
    idle: Callable[[], bool],
    *,
    interval: float = INTERVAL,
    growth: int = GROWTH,
    trim: Callable[[], object] | object | None = LIBC,
    rss: Callable[[], int] = rss_bytes,
) -> None:
    """Every ``interval`` seconds: when ``idle()`` and RSS has grown by ``growth`` since the
    last trim, give free heap pages back. Runs until cancelled."""
    if trim is None:
        return
    floor = rss()
    while True:
        await asyncio.sleep(interval)
        if rss() - floor > growth and idle():
            call = find_trim() if trim is LIBC else trim
            if not callable(call):
                return
            call()
            floor = rss()
