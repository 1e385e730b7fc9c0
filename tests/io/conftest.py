"""The proxy's two HTTP/1.1 halves (broker.server, broker.http1) run on asyncio's own loop and
on uvloop, the loop ``erp-broker run`` uses: transports differ between them (uvloop's TLS
transport, its read sizes, when it calls pause_writing), and both must behave the same."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
