"""Where a replicated server's time goes: py-spy profiles of the leader and one backup daemon
while the app's load tool drives the leader's server, and perf counters of every process
involved over the same window.

    .venv/bin/python benchmarks/profile_app.py [--app redis] [--conns 32] [--seconds 4]
        [--transport shm] [--replicas 3] [--top 12] [--out results/benchmarks/profile_app.json]

Starts an APUS cluster replicating the app, runs the load tool (redis-benchmark or memcaslap)
long enough to cover the sampling window, and records each daemon with `py-spy record --format
raw` (the `dev` extra installs py-spy; it needs ptrace, so run it as root). Prints, per
daemon, the functions that were on CPU most (self samples, the innermost frame) and the share
of samples per thread, plus the leader's shim counters and round timings over the window, so
the profile and the consensus numbers come from one run. The JSON file carries every table and
the environment.

`perf stat` (Debian's linux-perf, provisioned by the playbooks' `profiling` role on first use)
counts, per process (both daemons, both servers, the load tool), the CPU it used, its context
switches and CPU migrations, each also per consensus round: a round that costs several
wake-ups of processes spread over the CPUs shows as switches per round, which a Python profile
cannot. Hardware counters (cycles, instructions) are asked for too and recorded as "not
supported" where the machine (a VM, often) does not expose them.
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
from gaia.provision import ensure

TOOLS = {"redis": "redis-benchmark", "memcached": "memcaslap"}
SERVERS = {"redis": "redis-server", "memcached": "memcached"}
PERF_EVENTS = ("task-clock", "context-switches", "cpu-migrations", "cycles", "instructions")


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


def server_pid(daemon: int, binary: str) -> int:
    """The app server a replica daemon started (its child, through any launcher)."""
    todo = [daemon]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in map(int, (task / "children").read_text().split()):
                # comm, not argv: Redis rewrites its command line ("redis-server host:port")
                if Path(f"/proc/{child}/comm").read_text().strip() == binary[:15]:
                    return child
                todo.append(child)
    raise RuntimeError(f"no {binary} under replica daemon {daemon}")


def perf_on(perf: str, pid: int, seconds: float) -> subprocess.Popen[str]:
    """Count PERF_EVENTS over every thread of `pid` for `seconds` (CSV on stderr)."""
    events = ",".join(PERF_EVENTS)
    argv = [perf, "stat", "-x", ",", "-e", events, "-p", str(pid), "--", "sleep", str(seconds)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def perf_counts(process: subprocess.Popen[str], seconds: float, rounds: int) -> dict[str, Any]:
    """perf stat's CSV lines (value,unit,event,...) as counts, CPU share and per-round rates;
    an event the machine does not count is named with perf's reason."""
    _, err = process.communicate(timeout=seconds + 60)
    counts: dict[str, float] = {}
    missing: dict[str, str] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or fields[2] not in PERF_EVENTS:
            continue
        value, event = fields[0], fields[2]
        if value == "<not counted>":  # counted, but the process never ran meanwhile
            counts[event] = 0.0
            continue
        try:
            counts[event] = float(value)
        except ValueError:
            missing[event] = value.strip("<>")  # "not supported"
    if "task-clock" not in counts:
        raise SystemExit(f"perf stat counted nothing (exit {process.returncode}): {err.strip()}")
    out: dict[str, Any] = {
        "cpu_percent": round(counts["task-clock"] / (seconds * 1000) * 100, 1),
        "counts": counts,
        "not_counted": missing,
    }
    if rounds:
        for event in ("context-switches", "cpu-migrations"):
            if event in counts:
                out[f"{event}_per_round"] = round(counts[event] / rounds, 2)
    return out


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
    ensure(["profiling"])
    perf = shutil.which("perf") or "perf"
    profiles: dict[str, Any] = {}
    counting: dict[str, subprocess.Popen[str]] = {}
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
                daemons = {
                    role: daemon_pid(cluster, replica)
                    for role, replica in (("leader", leader), ("backup", backup))
                }
                watched = {f"{role} daemon": pid for role, pid in daemons.items()}
                for role, pid in daemons.items():
                    watched[f"{role} {SERVERS[args.app]}"] = server_pid(pid, SERVERS[args.app])
                watched[TOOLS[args.app]] = bench.pid
                counting = {name: perf_on(perf, pid, args.seconds) for name, pid in watched.items()}
                spies = {
                    role: spy_on(spy, pid, args.seconds, work / role)
                    for role, pid in daemons.items()
                }
                for role, p in spies.items():
                    _, err = p.communicate(timeout=args.seconds + 60)
                    if p.returncode != 0:
                        raise SystemExit(f"py-spy on the {role} failed: {err.decode().strip()}")
                after, backup_after = (cluster.statuses()[i] for i in (leader, backup))
                assert before is not None and after is not None
                rounds = after["timing_totals"]["count"] - before["timing_totals"]["count"]
                counters = {
                    name: perf_counts(c, args.seconds, rounds) for name, c in counting.items()
                }
            finally:
                for c in counting.values():
                    if c.poll() is None:
                        c.kill()
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
    table = Table("process", "CPU %", "context switches / round", "migrations / round",
                  title=f"perf stat over the window ({rounds} rounds)")  # fmt: skip
    for name, counted in counters.items():
        table.add_row(
            name,
            f"{counted['cpu_percent']:.1f}",
            str(counted.get("context-switches_per_round", "")),
            str(counted.get("cpu-migrations_per_round", "")),
        )
    console.print(table)
    absent = {e: r for counted in counters.values() for e, r in counted["not_counted"].items()}
    if absent:
        console.print(f"not counted on this machine: {absent}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = describe(
            target="local",
            parameters=vars(args) | {"out": str(args.out)},
            debian_packages=["redis-server", "redis-tools", "memcached", "libmemcached-tools"],
            results_dir=args.out.parent,
        )
        doc = {"env": env, "window": window, "profiles": profiles, "perf": counters}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
