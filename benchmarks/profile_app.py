"""Where a replicated server's time goes: py-spy profiles of the leader and one backup daemon
while the app's load tool drives the leader's server.

    .venv/bin/python benchmarks/profile_app.py [--app redis] [--conns 32] [--seconds 4]
        [--transport shm] [--replicas 3] [--top 12] [--out results/benchmarks/profile_app.json]

Starts an APUS cluster replicating the app, runs the load tool (redis-benchmark or memcaslap)
long enough to cover the sampling window, and records each daemon with `py-spy record --format
raw` (the `dev` extra installs py-spy; it needs ptrace, so run it as root). Prints, per
daemon, the functions that were on CPU most (self samples, the innermost frame) and the share
of samples per thread, plus the leader's shim counters and round timings over the window, so
the profile and the consensus numbers come from one run. The JSON file carries every table and
the environment.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gaia.apps.loadgen import ToolLoad, driver
from gaia.apus.systems import ApusCluster
from gaia.environment import describe

TOOLS = {"redis": "redis-benchmark", "memcached": "memcaslap"}


def daemon_pid(cluster: ApusCluster, replica: int) -> int:
    """The replica daemon's own pid (the launcher may have exec'd it inside its namespace)."""
    pid = cluster.servers[replica].pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"gaia.apus.replica" in cmdline:
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, children):
        if b"gaia.apus.replica" in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise RuntimeError(f"no replica daemon under pid {pid}")


def spy_on(spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling `pid` (every thread, 250 Hz, only while it holds the GIL: what its
    Python spends CPU on, not where it waits) into `out` for `seconds` (whole seconds)."""
    argv = [spy, "record", "-p", str(pid), "-d", str(round(seconds)), "-r", "250", "-f", "raw"]
    argv.append("--gil")  # only samples holding the GIL: the daemon's Python on CPU
    return subprocess.Popen(
        [*argv, "--threads", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def summarize(raw: Path, top: int) -> dict[str, Any]:
    """py-spy's raw stacks ("thread;frame;...;frame count" lines) as shares of all samples."""
    threads: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0].split(": ", 1)[-1]] += n
        self_time[frames[-1]] += n

    def share(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "threads": {t: share(n) for t, n in threads.most_common()},
        "self": [{"frame": f, "percent": share(n)} for f, n in self_time.most_common(top)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--app", choices=sorted(TOOLS), default="redis")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed: ./invoke setup installs the dev extra")
    tool = driver(TOOLS[args.app])
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gaia-profile-") as tmp:
        work = Path(tmp)
        cluster = ApusCluster(args.replicas, work, transport=args.transport, app=args.app)
        cluster.start()
        try:
            leader = cluster.leader()
            assert leader is not None
            backup = next(i for i in cluster.addresses if i != leader)
            load = ToolLoad(args.conns, 1_000_000, 64, ("set", "get"), timeout_s=600)
            command = tool.command(cluster.app_address(), load, work)
            for name, text in command.files.items():
                (work / name).write_text(text)
            bench = subprocess.Popen(
                command.argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(0.5)  # past the tool's start-up
                before, backup_before = (cluster.statuses()[i] for i in (leader, backup))
                spies = {
                    role: spy_on(spy, daemon_pid(cluster, replica), args.seconds, work / role)
                    for role, replica in (("leader", leader), ("backup", backup))
                }
                for role, p in spies.items():
                    _, err = p.communicate(timeout=args.seconds + 60)
                    if p.returncode != 0:
                        raise SystemExit(f"py-spy on the {role} failed: {err.decode().strip()}")
                after, backup_after = (cluster.statuses()[i] for i in (leader, backup))
            finally:
                bench.kill()
                bench.wait()
            for role in spies:
                profiles[role] = summarize(work / role, args.top)
        finally:
            cluster.stop()
    assert before is not None and after is not None
    assert backup_before is not None and backup_after is not None
    refused = (
        backup_after["app"]["shim"]["out_of_turn"] - backup_before["app"]["shim"]["out_of_turn"]
    )
    shim = {k: after["app"]["shim"][k] - before["app"]["shim"][k] for k in after["app"]["shim"]}
    t0, t1 = before["timing_totals"], after["timing_totals"]
    rounds = t1["count"] - t0["count"]
    window = {
        "inputs_read": shim["calls"],
        "rounds": rounds,
        "inputs_per_round": round(shim["calls"] / rounds, 2) if rounds else None,
        "round_quorum_us": round((t1["quorum_s"] - t0["quorum_s"]) / rounds * 1e6, 1)
        if rounds
        else None,
        "inputs_per_s": round(shim["calls"] / args.seconds),
        "backup_reads_out_of_turn": refused,
    }
    console.print(f"{args.app} at {args.conns} connections over {args.seconds:g} s: {window}")
    for role, prof in profiles.items():
        table = Table("frame (innermost)", "% of samples", title=f"{role} daemon: on CPU")
        for row in prof["self"]:
            table.add_row(row["frame"], f"{row['percent']:.1f}")
        console.print(table)
        console.print(f"{role} threads (% of samples): {prof['threads']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = describe(
            target="local",
            parameters=vars(args) | {"out": str(args.out)},
            debian_packages=["redis-server", "redis-tools", "memcached", "libmemcached-tools"],
            results_dir=args.out.parent,
        )
        doc = {"env": env, "window": window, "profiles": profiles}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
