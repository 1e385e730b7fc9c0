"""Compare proxies head to head, or profile one: where does the CPU go?

    python -m bench.profile [--seconds 8] [--runs 5] TARGET...
    python -m bench.profile --py-spy out.svg erp-broker
    python -m bench.profile --tls minimal erp-broker   # TLS to the origin, as deployed

TARGET is ``minimal``, ``nginx`` or ``erp-broker`` (each also as ``minimal/TLS`` and so on:
HTTPS to the origin), or ``erp-broker@/path``: a broker whose ``broker`` package is imported
from /path (a copy of an older tree: the before of an optimisation). A broker target may carry
variants, to price each optional feature in one run (they combine, and may end in ``@/path``):

* ``erp-broker+tracing``: ``tracing`` exporting to a collector that takes everything
  (bench.sink, on the load core); ``+tracing-dead``: to a port where nothing listens;
* ``erp-broker+no-links``: ``rewrite_links: false`` (the benchmark's ``ifs_apps10`` connector
  has it on, as ``ifs_apps10`` connectors do by default);
* ``erp-broker+encrypted``: ``store.encryption_key`` set, tokens encrypted at rest;
* ``erp-broker+tls``: HTTPS to the origin, verified with the benchmark's CA (``ca_file``).

Every target is started as in the benchmark (pinned to core 0) and loaded in turn by wrk, run
after run; the median req/s and CPU µs per request are printed. With ``--py-spy`` the first
target is recorded with py-spy (``pip install py-spy``): an SVG flame graph, or raw collapsed
stacks for a ``.txt`` name.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from .procs import LOAD_CPU, SUT_CPU, free_port
from .runner import TLS, Bench, Settings, Target, preflight, workdir, wrk

#: What may follow "erp-broker+" in a target (combined with "+").
VARIANTS = {"tracing", "tracing-dead", "no-links", "encrypted", "tls"}


def start(bench: Bench, spec: str, targets: dict[str, Target], tls: bool) -> Target:
    if spec in targets:
        return targets[spec]
    name, _, path = spec.partition("@")
    name, *variants = name.split("+")
    if name != "erp-broker" or not (path or variants) or not set(variants) <= VARIANTS:
        raise SystemExit(f"unknown target {spec!r} (variants: {', '.join(sorted(VARIANTS))})")
    config, port, admin = bench.broker_config(
        f"broker-{len(bench.procs)}", bench.token_url, tls=tls or "tls" in variants
    )
    data = yaml.safe_load(config.read_text())
    if "tracing" in variants or "tracing-dead" in variants:
        endpoint = bench.sink if "tracing" in variants else f"http://127.0.0.1:{free_port()}"
        data["tracing"] = {"otlp_endpoint": endpoint, "sample_ratio": 1.0}
    if "no-links" in variants:
        data["connectors"]["origin"]["rewrite_links"] = False
    if "encrypted" in variants:
        data["store"]["encryption_key"] = base64.b64encode(os.urandom(32)).decode("ascii")
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    exe = shutil.which("erp-broker")
    argv = [exe, "run"] if exe else [sys.executable, "-m", "broker", "run"]
    # PYTHONPATH wins over the installed package for the console script.
    proc = bench.spawn(
        f"broker-{len(bench.procs)}",
        [*argv, "-c", str(config)],
        SUT_CPU,
        env={"PYTHONPATH": str(Path(path).resolve())} if path else {},
    )
    bench.wait_ready(proc, admin)
    return Target(spec, f"http://127.0.0.1:{port}/origin", proc)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("targets", nargs="+")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--path", default="/small")
    parser.add_argument("--py-spy", dest="py_spy", help="record the first target with py-spy")
    parser.add_argument("--tls", action="store_true", help="every proxy reaches the origin by TLS")
    args = parser.parse_args()
    preflight()
    with workdir(False) as path:
        bench = Bench(Settings(), path)
        try:
            bench.start_origin()
            bench.start_sink()
            bench.token_url = bench.start_token_server("token-server", 3600)
            bench.token = bench.fetch_token(bench.token_url)
            if args.tls:  # the standard targets keep their plain names ("minimal")
                standard = {t.name.removesuffix(TLS): t for t in bench.targets(tls=True) if t.proc}
            else:
                standard = {t.name: t for t in bench.targets()}
                if any(spec.endswith("/TLS") for spec in args.targets):  # minimal/TLS …
                    standard |= {t.name: t for t in bench.targets(tls=True)}
            chosen = [start(bench, spec, standard, args.tls) for spec in args.targets]
            for target in chosen:
                bench.check(target)
                wrk(target.base + args.path, args.connections, 2.0)
            if args.py_spy:
                record(chosen[0], args)
                return 0
            results: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in chosen}
            for run in range(args.runs):
                for target in chosen:
                    assert target.proc is not None
                    cpu0 = target.proc.cpu_seconds()
                    r = wrk(target.base + args.path, args.connections, args.seconds)
                    cpu = (target.proc.cpu_seconds() - cpu0) * 1e6 / r["requests"]
                    results[target.name].append((r["rps"], cpu, r["p99_ms"]))
                    print(
                        f"run {run + 1} {target.name:30} {r['rps']:8.0f} req/s {cpu:6.1f} µs/req"
                        f"  p99 {r['p99_ms']:.2f} ms",
                        flush=True,
                    )
            print()
            for name, rows in results.items():
                rps = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                p99 = statistics.median(r[2] for r in rows)
                print(f"median {name:30} {rps:8.0f} req/s {cpu:6.1f} µs/req  p99 {p99:.2f} ms")
        finally:
            bench.stop_all()
    return 0


def record(target: Target, args: argparse.Namespace) -> None:
    assert target.proc is not None
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out = Path(args.py_spy).resolve()
    spy = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(LOAD_CPU),
            "py-spy",
            "record",
            "--pid",
            str(target.proc.pid),
            "--duration",
            str(int(args.seconds)),
            "--rate",
            "200",
            "--nonblocking",
            "-o",
            str(out),
            *(["--format", "raw"] if out.suffix == ".txt" else []),
        ],
    )
    r = wrk(target.base + args.path, args.connections, args.seconds)
    spy.wait(timeout=120)
    print(f"{target.name}: {r['rps']:.0f} req/s while recording; profile in {out}")


if __name__ == "__main__":
    sys.exit(main())
