"""`python -m gaia.apus.sim`: run the APUS core through many seeded fault schedules.

    python -m gaia.apus.sim --seeds 1000 --replicas 3,5,7,9 --faults all
    python -m gaia.apus.sim --seed 4711 --replicas 5 --faults all --trace   # replay one

Exits 1 on any violation, after printing the seed, the smallest set of fault kinds that still
breaks it, and the command that replays it with a trace.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from gaia.apus.sim.world import Faults, SimParams, Stats, Violation, World


@dataclass(frozen=True)
class Outcome:
    params: SimParams
    stats: Stats | None
    violation: str | None
    tick: int = -1


def run_one(p: SimParams) -> Outcome:
    try:
        return Outcome(p, World(p).run(), None)
    except Violation as v:
        return Outcome(p, None, str(v), v.tick)
    except Exception as e:  # a crash of the core is a bug like any violation
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(p, None, f"{type(e).__name__}: {e} at {where.filename}:{where.lineno}")


def minimize(p: SimParams) -> SimParams:
    """Drop fault kinds one at a time while the seed still fails: the fewer kinds remain, the
    shorter the trace a person must read."""
    for kind in sorted(p.faults.kinds):
        smaller = replace(p, faults=p.faults.without(kind))
        if run_one(smaller).violation is not None:
            p = smaller
    return p


def sweep(seeds: range, replicas: list[int], faults: Faults, jobs: int) -> Iterator[Outcome]:
    params = [SimParams(replicas=r, seed=s, faults=faults) for s in seeds for r in replicas]
    if jobs <= 1:
        yield from map(run_one, params)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(run_one, params, chunksize=16)


def replay(p: SimParams) -> int:
    lines: list[str] = []
    try:
        stats = World(p, trace=lines.append).run()
    except Violation as v:
        print("\n".join(lines))
        print(f"VIOLATION at t={v.tick}: {v}")
        return 1
    print("\n".join(lines))
    print(f"ok: {stats}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaia.apus.sim", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds (from --first)")
    ap.add_argument("--first", type=int, default=0, help="first seed of the sweep")
    ap.add_argument("--seed", type=int, help="run only this seed (with --trace to see it)")
    ap.add_argument("--replicas", default="3,5", help="comma-separated group sizes (1-15)")
    ap.add_argument("--faults", default="all", help="all, none, or a list of: delay,drop,...")
    ap.add_argument("--trace", action="store_true", help="print every role change and fault")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        faults = Faults.parse(args.faults)
        replicas = [int(r) for r in args.replicas.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if any(not 1 <= r <= 15 for r in replicas):
        ap.error("replicas must be between 1 and 15")

    if args.seed is not None:
        return max(replay(SimParams(replicas=r, seed=args.seed, faults=faults)) for r in replicas)

    started = time.monotonic()
    runs = steps = commits = views = crashes = stepdowns = 0
    failures: list[Outcome] = []
    total = args.seeds * len(replicas)
    for out in sweep(range(args.first, args.first + args.seeds), replicas, faults, args.jobs):
        runs += 1
        if out.stats is not None:
            steps += out.stats.steps
            commits += out.stats.commits
            views += out.stats.view_changes
            crashes += out.stats.crashes
            stepdowns += out.stats.stepdowns
        else:
            failures.append(out)
        if runs % 500 == 0:
            print(f"  {runs}/{total} runs, {len(failures)} violations", file=sys.stderr)
    took = time.monotonic() - started
    print(
        f"seeds {args.seeds} x replicas {replicas} = {runs} runs, faults {faults}: "
        f"{steps} steps, {commits} commits, {views} view changes, {crashes} crashes, "
        f"{stepdowns} step-downs, {len(failures)} violations ({took:.1f} s)"
    )
    for out in failures[:5]:
        small = minimize(out.params)
        print(
            f"VIOLATION seed {out.params.seed}, {out.params.replicas} replicas, t={out.tick}: "
            f"{out.violation}\n  still fails with faults {small.faults}; replay: python -m "
            f"gaia.apus.sim --seed {small.seed} --replicas {small.replicas} "
            f"--faults {small.faults} --trace"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
