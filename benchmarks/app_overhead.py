"""Redis under APUS against the same Redis unreplicated, side by side in one run.

    .venv/bin/python benchmarks/app_overhead.py [--trials 3] [--requests 3000] [--conns 1 8]
        [--transport shm] [--replicas 3] [--out results/benchmarks/app_overhead.json]

redis-benchmark (50% SET / 50% GET, 64-byte values) drives each configuration; the trials of
both systems are interleaved so that machine noise hits them alike. Prints the median over
trials (95% bootstrap interval) of throughput and p50 latency per system and connection count,
and the APUS/unreplicated ratio; the JSON file carries every trial and the environment. This is
the quick look behind the redis-overhead experiment, without the emulated client RTT.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gaia.apps import get_app, wait_listening
from gaia.apus.systems import ApusCluster
from gaia.cluster.procs import free_ports
from gaia.environment import describe
from gaia.stats import median_ci


def redis_benchmark(address: tuple[str, int], requests: int, conns: int) -> dict[str, float]:
    """Throughput (requests/s) and p50 latency (µs) over SET and GET together."""
    argv = ["redis-benchmark", "-h", address[0], "-p", str(address[1]), "-t", "set,get"]
    argv += ["-d", "64", "-n", str(requests), "-c", str(conns), "--csv"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    if len(rows) != 2:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    rps = [float(r["rps"]) for r in rows]
    return {
        "rps": len(rps) / sum(1 / x for x in rps),  # both halves ran the same request count
        "p50_us": 1000 * sum(float(r["p50_latency_ms"]) for r in rows) / 2,
    }


def unreplicated(work: Path, requests: int, conns: int) -> dict[str, float]:
    app = get_app("redis")
    (port,) = free_ports(1)
    argv = app.argv("127.0.0.1", port, work)
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=work) as proc:
        try:
            wait_listening(port, 20, lambda: proc.poll() is None)
            return redis_benchmark(("127.0.0.1", port), requests, conns)
        finally:
            proc.terminate()


def replicated(work: Path, args: argparse.Namespace, conns: int) -> dict[str, float]:
    cluster = ApusCluster(args.replicas, work / "logs", transport=args.transport, app="redis")
    cluster.start()
    try:
        leader = cluster.leader()
        assert leader is not None
        return redis_benchmark(cluster.app_addresses[leader], args.requests, conns)
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--conns", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    apus = f"apus-{args.transport} x{args.replicas}"
    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gaia-bench-") as tmp:
        for trial in range(args.trials):
            for conns in args.conns:
                for system in ("unreplicated", apus):
                    work = Path(tmp) / f"{system}-{conns}-{trial}".replace(" ", "_")
                    work.mkdir()
                    if system == "unreplicated":
                        m = unreplicated(work, args.requests, conns)
                    else:
                        m = replicated(work, args, conns)
                    trials.append({"system": system, "conns": conns, "trial": trial, **m})
                    console.print(f"trial {trial} {system} c={conns}: {m['rps']:.0f} rps")

    table = Table("conns", "system", "rps (median, 95% CI)", "p50 µs", "throughput ratio")
    for conns in args.conns:
        base = None
        for system in ("unreplicated", apus):
            mine = [t for t in trials if t["conns"] == conns and t["system"] == system]
            rps = median_ci([t["rps"] for t in mine])
            base = base or rps
            p50 = median_ci([t["p50_us"] for t in mine])
            table.add_row(
                str(conns),
                system,
                f"{rps.median:.0f} [{rps.low:.0f}, {rps.high:.0f}]",
                f"{p50.median:.0f}",
                f"{rps.median / base.median:.3f}",
            )
    console.print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = describe(
            target="local",
            parameters=vars(args) | {"out": str(args.out)},
            debian_packages=["redis-server", "redis-tools"],
            results_dir=args.out.parent,
        )
        args.out.write_text(json.dumps({"env": env, "trials": trials}, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
