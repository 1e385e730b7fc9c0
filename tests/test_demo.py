"""`erp-broker demo`, run as a newcomer runs it: every curl line it prints works."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import socket
import sys
import time

import aiohttp
from yarl import URL

#: What the demo prints once it is ready, before the curl lines' explanation ends.
LAST_LINE = "Press Ctrl-C to stop."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def curl_commands(output: str) -> list[tuple[str, str, str | None]]:
    """(method, url, grep pattern or None) of every `curl` line of the demo's output."""
    commands = []
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("curl "):
            continue
        curl, _, pipe = line.partition(" | ")
        words = shlex.split(curl)
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        pattern = shlex.split(pipe)[1] if pipe.startswith("grep") else None
        commands.append((method, words[-1], pattern))
    return commands


class TestDemo:
    async def test_every_printed_curl_line_succeeds(self) -> None:
        """The demo is ready within seconds, every curl line it prints answers 2xx through the
        broker (one per route and per admin endpoint), and Ctrl-C stops it with exit 0."""
        listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "broker", "demo", "--listen", listen, "--admin-listen", admin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(20):
                while LAST_LINE not in lines:
                    raw = await proc.stdout.readline()
                    assert raw, f"the demo exited early: {(await proc.stderr.read()).decode()}"
                    lines.append(raw.decode().strip())
            output = "\n".join(lines)
            commands = curl_commands(output)
            assert len(commands) == output.count("curl -s") >= 10
            routes = {URL(url).path.split("/")[1] for _, url, _ in commands if f":{listen.split(':')[1]}/" in url}
            assert routes == {"ifs", "pso", "infor"}
            assert any(admin in url for _, url, _ in commands)
            async with aiohttp.ClientSession() as http:
                for method, url, pattern in commands:
                    async with http.request(method, URL(url, encoded=True)) as resp:
                        body = await resp.text()
                        assert resp.status == 200, (method, url, resp.status, body[:300])
                        assert "X-Broker-Error" not in resp.headers
                    if pattern is not None:
                        assert re.search(pattern, body, re.MULTILINE), (url, pattern)
            assert time.monotonic() - started < 15
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(15):
                code = await proc.wait()
                err = (await proc.stderr.read()).decode()
            assert code == 0, err
            assert "erp-broker demo stopped." in err and "Traceback" not in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
