"""Command line: run, check, test-connection, discover, status, demo.

Exit codes: 0 success; 1 the command ran and failed (a connection test, an unreachable broker);
2 bad usage or configuration (nothing was started).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import yaml

from . import __version__
from .config import Config, config_path, config_warnings, load_config
from .crypto import Codec
from .errors import BrokerError, ConfigError, StoreError
from .logs import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _print_problems(problems: list[str]) -> None:
    for line in problems:
        print(line, file=sys.stderr)


def _load(args: argparse.Namespace) -> Config:
    path = config_path(args.config)
    # `run --listen/--admin-listen`: a container listens on 0.0.0.0 without its own config.
    overrides = {
        key: value
        for key in ("listen", "admin_listen")
        if (value := getattr(args, f"override_{key}", None)) is not None
    }
    config = load_config(path, overrides)
    Codec(config.store.encryption_key, config.store.previous_encryption_keys)  # key is valid
    return config


def _setup_logging(args: argparse.Namespace, config: Config | None) -> None:
    level = args.log_level or (config.log_level if config else "info")
    fmt = args.log_format or (config.log_format if config else "auto")
    configure_logging(level, fmt)


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve(config: Config) -> int:
    from .app import run_until_stopped

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_until_stopped(config, stop)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    _print_problems([f"warning: {line}" for line in config_warnings(config)])
    _setup_logging(args, config)
    return _run_async(_serve(config))


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    _print_problems([f"warning: {line}" for line in config_warnings(config)])
    print(f"# {config.source}: OK ({len(config.connectors)} connectors); secrets masked")
    print(yaml.safe_dump(config.redacted(), sort_keys=False), end="")
    for name, connector in config.connectors.items():
        if not connector.tls_verify:
            print(f"warning: connectors.{name}.tls_verify is false", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from .commands import status

    return _run_async(status(_load(args), args.format))


def cmd_test_connection(args: argparse.Namespace) -> int:
    from .commands import test_connection

    config = _load(args)
    _setup_logging(args, config) if args.verbose else None
    if not args.all and not args.name:
        print("test-connection: name a connector or pass --all", file=sys.stderr)
        return EXIT_USAGE
    name = None if args.all else args.name
    return _run_async(test_connection(config, name, args.format, args.verbose))


def cmd_discover(args: argparse.Namespace) -> int:
    from .commands import discover

    config = _load(args)
    # stdout is the listing: the broker's log lines (warnings, unless asked) go to stderr.
    configure_logging(args.log_level or "warning", args.log_format or "auto", stream=sys.stderr)
    return _run_async(discover(config, args.name, args.projection, args.format, args.refresh))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoPortError, run_demo

    if args.config is not None:
        print(
            "demo: -c/--config is not used: the demo writes a config of its own and names it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configure_logging(args.log_level or "warning", args.log_format or "auto", stream=sys.stderr)
    try:
        return _run_async(run_demo(args.listen, args.admin_listen))
    except DemoPortError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erp-broker",
        description="Credential-broker sidecar for IFS Applications 10, IFS PSO and Infor ION.",
    )
    parser.add_argument("--version", action="version", version=f"erp-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "-c",
            "--config",
            help="config file (default: $ERP_BROKER_CONFIG, else ./config/broker.yaml)",
        )
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        p.add_argument("--log-format", choices=["auto", "json", "console"])
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "run the broker until SIGTERM/SIGINT")
    p.add_argument(
        "--listen",
        dest="override_listen",
        metavar="HOST:PORT",
        help="proxy listener instead of the config's listen (e.g. 0.0.0.0:8080 in a container)",
    )
    p.add_argument(
        "--admin-listen",
        dest="override_admin_listen",
        metavar="HOST:PORT",
        help="admin listener instead of the config's admin_listen",
    )
    command("check", cmd_check, "validate the config and print it with secrets masked")
    p = command(
        "test-connection",
        cmd_test_connection,
        "obtain a credential and call the ERP's check endpoint",
    )
    p.add_argument("name", nargs="?", help="connector name")
    p.add_argument("--all", action="store_true", help="test every connector")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show each step: token endpoint and status, token lifetime, the check call",
    )
    p = command(
        "discover", cmd_discover, "list an IFS Apps 10 instance's projections and operations"
    )
    p.add_argument("name", help="an ifs_apps10 connector")
    p.add_argument("--projection", help="show the operations of this projection only")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--refresh", action="store_true", help="fetch again instead of using the cache")
    p = command("status", cmd_status, "show the connectors of the running broker (admin_listen)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p = command("demo", cmd_demo, "run simulators of all three ERPs and a broker wired to them")
    p.add_argument(
        "--listen", help="proxy listener (host:port; default 127.0.0.1:8080, else a free port)"
    )
    p.add_argument(
        "--admin-listen",
        help="admin listener (host:port; default 127.0.0.1:9090, else a free port)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"error: store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
