"""`erp-broker demo`, run as a newcomer runs it: every curl line it prints works."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
        proc, lines = await start_demo("--listen", listen, "--admin-listen", admin)
        assert proc.stderr is not None
        try:
            output = "\n".join(lines)
            commands = curl_commands(output)
            assert len(commands) == output.count("curl -s") >= 10
            routes = {
                URL(url).path.split("/")[1]
                for _, url, _ in commands
                if f":{listen.split(':')[1]}/" in url
            }
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


async def start_demo(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    """`erp-broker demo ARGS`, read until it is ready; (process, printed lines)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "demo",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while LAST_LINE not in lines:
                raw = await proc.stdout.readline()
                assert raw, f"the demo exited early: {(await proc.stderr.read()).decode()}"
                lines.append(raw.decode().strip())
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, lines


async def stop_demo(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def hold(port: int) -> socket.socket | None:
    """Listen on 127.0.0.1:port so that it is taken (None when something else has it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None
    return sock


async def run_shell(line: str) -> tuple[int, str, str]:
    """A printed command line, run by a shell with this environment's `erp-broker` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = await asyncio.create_subprocess_shell(
        line, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class TestDemoAsAStartingPoint:
    async def test_default_ports_taken_then_every_printed_command_works(self) -> None:
        """With 8080 and 9090 taken the demo says so and uses free ports; it names its config
        file, and every `erp-broker` command it prints runs against it with exit 0 (status,
        test-connection --all, -v with each step, discover, check): no secret printed."""
        held = [hold(8080), hold(9090)]
        try:
            proc, lines = await start_demo()
        finally:
            for sock in held:
                if sock is not None:
                    sock.close()
        try:
            output = "\n".join(lines)
            assert "note: port 8080 is taken" in output and "--listen" in output
            assert "note: port 9090 is taken" in output and "--admin-listen" in output
            assert "127.0.0.1:8080" not in output and "127.0.0.1:9090" not in output
            commands = [line for line in lines if line.startswith("erp-broker ") and " -c " in line]
            words = [shlex.split(c)[1:3] for c in commands]
            for wanted in (
                ["status", "-c"],
                ["test-connection", "--all"],
                ["discover", "ifs"],
                ["check", "-c"],
            ):
                assert wanted in words, (wanted, commands)
            config_file = Path(shlex.split(commands[0])[-1])
            assert f"config is {config_file}" in output and config_file.is_file()
            assert config_file.stat().st_mode & 0o077 == 0
            for line in commands:
                code, out, err = await run_shell(line)
                assert code == 0, (line, out, err)
                assert "Traceback" not in err
                if " -v " in line:
                    assert "login: POST http://127.0.0.1:" in out and "/token -> 200" in out
                    assert "token: lifetime 180s (from expires_in)" in out
                    assert "check: GET http://127.0.0.1:" in out and "Projections -> 200" in out
                if line.split()[1] == "status":
                    assert out.splitlines()[0].split()[-1] == "UP"
                    assert [row.split()[-1] for row in out.splitlines()[1:4]] == ["yes"] * 3
                from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim

                for secret in (
                    IfsApps10Sim().client_secret,
                    IfsApps10Sim().password,
                    PsoSim().password,
                    InforIonSim().sask,
                ):
                    assert secret not in out + err, line
            # The admin curl lines point at the port really used.
            admin = next(line.split()[1] for line in lines if line.startswith("admin "))
            assert any(line.startswith(f"curl -s {admin}/") for line in lines)
        finally:
            await stop_demo(proc)

    async def test_a_given_port_that_is_taken_fails_in_one_line(self) -> None:
        """--listen naming a taken port: exit 2, one line naming the port and --listen."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{free_port()}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
        assert proc.returncode == 2, (out, err)
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1 and str(port) in lines[0] and "--listen" in lines[0], lines
        assert out == b""

    def test_config_option_is_refused(self) -> None:
        """`demo -c FILE` is not silently ignored."""
        result = subprocess.run(
            [sys.executable, "-m", "broker", "demo", "-c", "x.yaml"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "demo: -c/--config is not used: the demo writes a config of its own and names it"
        ]
