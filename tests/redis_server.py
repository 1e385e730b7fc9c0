"""A real redis-server for the fleet tests: loopback, a free port, nothing persisted."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

REDIS_SERVER = "redis-server"


@dataclass(frozen=True)
class RedisTls:
    cert_file: str
    key_file: str
    ca_file: str


def redis_server_binary() -> str:
    """The redis-server path; a failure under CI (where `.ci/run` installs it), else a skip."""
    found = shutil.which(REDIS_SERVER) or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` as a child process; restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        tls: RedisTls | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
        ]
        if self.tls:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls.cert_file,
                "--tls-key-file",
                self.tls.key_file,
                "--tls-ca-cert-file",
                self.tls.ca_file,
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        args += list(self.extra)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server did not answer within {timeout}s: {self.log_text()}"
                )
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """PING answered (NOAUTH counts: the server is up, it just wants the password)."""
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=1.0)
        except OSError:
            return False
        sock: socket.socket = raw
        try:
            if self.tls:
                context = ssl.create_default_context(cafile=self.tls.ca_file)
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False
        finally:
            sock.close()
            raw.close()

    def log_text(self) -> str:
        path = self.workdir / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM and wait (nothing is saved: the data is gone, as after a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: a hung server (connections accepted, nothing answered)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


# -- highly available Redis: Sentinel and Cluster ------------------------------------------------

SERVICE = "erp-broker"


def _bounded(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def _client(port: int, password: str | None = None) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )


def _asks(port: int, *command: str, password: str | None = None) -> Any:
    """One command to a server or sentinel; None if it does not answer."""
    try:
        with _client(port, password) as client:
            return client.execute_command(*command)
    except (redis.RedisError, OSError):
        return None


class SentinelProcess(RedisServer):
    """``redis-sentinel`` watching one primary (short timeouts: a failover takes ~2 s)."""

    def __init__(self, workdir: Path, primary_port: int, password: str | None = None) -> None:
        super().__init__(workdir, password=password)
        self.binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        if not os.path.exists(self.binary):
            message = "redis-sentinel is not installed (apt-get install redis-sentinel)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.primary_port = primary_port

    def start(self, timeout: float = 10.0) -> SentinelProcess:
        config = self.workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "protected-mode no",
                    f"dir {self.workdir}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2",
                    f"sentinel down-after-milliseconds {SERVICE} 400",
                    f"sentinel failover-timeout {SERVICE} 2000",
                    f"sentinel parallel-syncs {SERVICE} 1",
                    *(
                        [
                            f"requirepass {self.password}",
                            f"sentinel auth-pass {SERVICE} {self.password}",
                        ]
                        if self.password
                        else []
                    ),
                    "",
                ]
            )
        )
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        _bounded(self._answers, timeout, f"redis-sentinel on {self.port} answers")
        return self


class SentinelGroup:
    """A primary, one replica and three sentinels on loopback, torn down by :meth:`kill`."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        """``password``: of the data nodes and the sentinels alike."""
        self.workdir = workdir
        self.password = password
        # A replica syncs at once (the default waits 5 s for more replicas to share the RDB).
        auth = ("--masterauth", password) if password else ()
        self.primary = RedisServer(
            workdir, password=password, extra=("--repl-diskless-sync-delay", "0", *auth)
        )
        self.replica = RedisServer(workdir, password=password)
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 15.0) -> SentinelGroup:
        try:
            self.primary.start()
            self.replica.extra = (
                *self.primary.extra,
                "--replicaof",
                "127.0.0.1",
                str(self.primary.port),
            )
            self.replica.start()
            self.sentinels = [
                SentinelProcess(self.workdir, self.primary.port, self.password) for _ in range(3)
            ]
            for sentinel in self.sentinels:
                sentinel.start()
            _bounded(self._replica_in_sync, timeout, "the replica is in sync")
            _bounded(
                self._sentinels_agree, timeout, "the sentinels know each other and the replica"
            )
        except BaseException:
            self.kill()
            raise
        return self

    def _replica_in_sync(self) -> bool:
        info = _asks(self.replica.port, "INFO", "replication", password=self.password)
        return bool(info) and info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            others = _asks(sentinel.port, "SENTINEL", "SENTINELS", SERVICE, password=self.password)
            replicas = _asks(sentinel.port, "SENTINEL", "REPLICAS", SERVICE, password=self.password)
            if not others or len(others) < 2 or not replicas:
                return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels report it (the first that answers)."""
        for sentinel in self.sentinels:
            answer = _asks(
                sentinel.port,
                "SENTINEL",
                "GET-MASTER-ADDR-BY-NAME",
                SERVICE,
                password=self.password,
            )
            if answer:
                return int(answer[1])
        return None

    def wait_promoted(self, timeout: float = 15.0) -> None:
        """Return once the sentinels name the replica the primary and it accepts writes."""

        def promoted() -> bool:
            role = _asks(self.replica.port, "ROLE", password=self.password)
            return self.primary_port() == self.replica.port and bool(role) and role[0] == b"master"

        _bounded(promoted, timeout, "the sentinels promote the replica")

    def kill(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            with contextlib.suppress(Exception):
                server.kill()


class ClusterGroup:
    """Three cluster-enabled redis-servers, every slot assigned, torn down by :meth:`kill`."""

    SLOTS = 16384

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.nodes = [RedisServer(workdir) for _ in range(nodes)]
        # The bus port must be free too (the default, port + 10000, may not even exist).
        self.bus_ports = [free_port() for _ in self.nodes]
        for node, bus in zip(self.nodes, self.bus_ports, strict=True):
            node.extra = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(workdir / f"nodes-{node.port}.conf"),
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(bus),
            )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 15.0) -> ClusterGroup:
        try:
            for node in self.nodes:
                node.start()
            share = self.SLOTS // len(self.nodes)
            for i, node in enumerate(self.nodes):
                last = self.SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * share - 1
                with _client(node.port) as client:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            with _client(self.nodes[0].port) as client:
                for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)
            _bounded(self._ok, timeout, "every cluster node reports cluster_state:ok")
        except BaseException:
            self.kill()
            raise
        return self

    def _ok(self) -> bool:
        for node in self.nodes:
            raw = _asks(node.port, "CLUSTER", "INFO")
            info = dict(line.split(":", 1) for line in (raw or b"").decode().split() if ":" in line)
            if not info or info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
        return True

    def flush(self) -> None:
        for node in self.nodes:
            with _client(node.port) as client:
                client.flushall()

    def kill(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
