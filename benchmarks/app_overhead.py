"""Redis under APUS against the same Redis unreplicated, side by side in one run.

    .venv/bin/python benchmarks/app_overhead.py [--trials 3] [--requests 3000] [--conns 1 8]
        [--transport shm] [--replicas 3] [--out results/benchmarks/app_overhead.json]

redis-benchmark (50% SET / 50% GET, 64-byte values) drives each configuration; the trials of
both systems are interleaved so that machine noise hits them alike. Prints the median over
trials (95% bootstrap interval) of throughput and mean response time per system and connection
count, and the APUS/unreplicated ratio; the JSON file carries every trial and the environment.
This is the quick look behind the redis-overhead experiment (`./invoke reproduce --exp
redis-overhead`), with the same systems and tool driver (gaia.apps.systems, gaia.apps.loadgen)
but without the emulated client round trip, the figures and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gaia.apps.loadgen import ToolLoad, driver, run_tool
from gaia.apps.systems import AppServer
from gaia.apus.systems import ApusCluster
from gaia.environment import describe
from gaia.stats import median_ci

REDIS_BENCHMARK = driver("redis-benchmark")


def measure(
    system: AppServer | ApusCluster, work: Path, requests: int, conns: int
) -> dict[str, Any]:
    """Start `system`, run redis-benchmark against the server its clients use, stop it."""
    load = ToolLoad(conns, requests, payload_bytes=64, operations=("set", "get"), timeout_s=600)
    system.start()
    try:
        metrics = run_tool(REDIS_BENCHMARK, system.app_address(), load, work, "redis-benchmark")
    finally:
        system.stop()
    return dataclasses.asdict(metrics)


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
                    server = (
                        AppServer(1, work, app="redis")
                        if system == "unreplicated"
                        else ApusCluster(
                            args.replicas, work, transport=args.transport, app="redis"
                        )
                    )
                    m = measure(server, work, args.requests, conns)
                    trials.append({"system": system, "conns": conns, "trial": trial, **m})
                    rps = m["throughput_rps"]
                    console.print(f"trial {trial} {system} c={conns}: {rps:.0f} rps")

    table = Table("conns", "system", "rps (median, 95% CI)", "mean µs", "throughput ratio")
    for conns in args.conns:
        base = None
        for system in ("unreplicated", apus):
            mine = [t for t in trials if t["conns"] == conns and t["system"] == system]
            rps = median_ci([t["throughput_rps"] for t in mine])
            base = base or rps
            mean = median_ci([t["mean_us"] for t in mine])
            table.add_row(
                str(conns),
                system,
                f"{rps.median:.0f} [{rps.low:.0f}, {rps.high:.0f}]",
                f"{mean.median:.0f}",
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
