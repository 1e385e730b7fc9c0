"""Brokers as real processes: `erp-broker run` started the way users start it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml


def free_port() -> int:
    """A loopback port free right now (the tiny race is acceptable in tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BrokerProcess:
    """`python -m broker run -c <file>` with JSON logs captured line by line."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.config_path = workdir / "broker.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.workdir = workdir
        self.env = {**os.environ, **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.stderr = ""
        self.events: list[dict[str, Any]] = []
        self.proxy_url = ""
        self.admin_url = ""
        self._started = asyncio.Event()
        self._printed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._err_reader: asyncio.Task[bytes] | None = None

    async def start(self, *, timeout: float = 15.0) -> BrokerProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "run",
            "-c",
            str(self.config_path),
            "--log-format",
            "json",
            cwd=self.workdir,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        assert self.process.stderr is not None
        self._err_reader = asyncio.create_task(self.process.stderr.read())
        try:
            async with asyncio.timeout(timeout):
                waiter = asyncio.create_task(self._started.wait())
                done, _ = await asyncio.wait(
                    {waiter, self._reader}, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter not in done:
                    waiter.cancel()
                    await self.wait()
                    raise RuntimeError(
                        f"broker exited before listening: {self.stderr}\n{self.lines}"
                    )
        except TimeoutError:
            await self.kill()
            raise
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            self.events.append(event)
            async with self._printed:
                self._printed.notify_all()
            if event.get("event") == "broker_started":
                self.proxy_url, self.admin_url = event["listen"], event["admin_listen"]
                self._started.set()

    async def wait_for_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log event called ``name``, waiting for it to be printed."""
        await self.wait_for_event_count(name, 1, timeout)
        return next(e for e in self.events if e.get("event") == name)

    async def wait_for_event_count(self, name: str, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` log events called ``name`` have been printed."""
        async with asyncio.timeout(timeout), self._printed:
            await self._printed.wait_for(
                lambda: sum(1 for e in self.events if e.get("event") == name) >= count
            )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
            if self._err_reader is not None:
                self.stderr = (await self._err_reader).decode("utf-8", "replace")
        return code

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines) + "\n" + self.stderr
