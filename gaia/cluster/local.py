"""A long-lived local APUS cluster for people: `invoke cluster.up / cluster.status / cluster.down`.

`up` starts a detached supervisor process (`python -m gaia.cluster.local run ...`) that starts
the replicas, writes the cluster's state file, and stops every replica (and removes its network
namespaces and shared memory) when it gets SIGTERM, so the cluster outlives the `invoke` command
but never its supervisor. Replicas run each in its own network namespace when the supervisor
can make them (root; isolation "auto", the default), else as plain processes on 127.0.0.1;
`status` says which and why ("isolation").

A supervisor that dies without stopping its cluster (SIGKILL, a crash) leaves the replicas
running. The next `up`, `status` or `down` finds its state file, sees it dead, and cleans up:
it kills the replicas it recorded (checking PID and start time, so never a stranger), removes
the namespaces (killing anything still inside) and the shared memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gaia.apus.systems import ApusCluster
from gaia.cluster import netns
from gaia.cluster.procs import ProcessIdentity
from gaia.transport.shm import cleanup_shm

DEFAULT_STATE_DIR = Path(".gaia") / "cluster"


class ClusterError(RuntimeError):
    """No cluster where one was expected, one where none should be, or a failed start."""


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"


def _alive(pid: int) -> bool:
    """Running, not a zombie (the supervisor stays our child when up() ran in this process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_state(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any] | None:
    """The running cluster's state, or None; the leftovers of a dead supervisor are cleaned up
    (see the module) and its stale file removed."""
    return _read(state_dir)[0]


def _read(state_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(the live cluster's state or None, what was cleaned up after a dead supervisor)."""
    path = _state_file(state_dir)
    if not path.exists():
        return None, []
    state: dict[str, Any] = json.loads(path.read_text())
    if _alive(int(state["supervisor"])):
        return state, []
    removed = clean_up_after(state)
    path.unlink(missing_ok=True)
    return None, removed


def clean_up_after(state: dict[str, Any]) -> list[str]:
    """Remove what a dead supervisor left: its replicas, namespaces and shared memory."""
    removed = []
    for name, identity in state.get("processes", {}).items():
        if ProcessIdentity(int(identity["pid"]), int(identity["start"])).kill_group():
            removed.append(f"{name} (pid {identity['pid']})")
    if state.get("isolation", {}).get("mode") == "netns":
        removed += netns.cleanup(state["network_id"])
    removed += [str(path) for path in cleanup_shm(state["cluster_id"])]
    return removed


def up(
    replicas: int,
    transport: str,
    durability: str,
    state_dir: Path = DEFAULT_STATE_DIR,
    timeout: float = 60.0,
    *,
    app: str = "",
    isolation: str = "auto",
) -> dict[str, Any]:
    if read_state(state_dir) is not None:
        raise ClusterError(f"a cluster is already up (state in {state_dir}); cluster.down first")
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "gaia.cluster.local", "run", "--state-dir", str(state_dir)]
    argv += ["--replicas", str(replicas), "--transport", transport, "--durability", durability]
    argv += ["--app", app]
    argv += ["--isolation", isolation]
    with open(state_dir / "supervisor.log", "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(state_dir)
        if state is not None:
            return state
        if proc.poll() is not None:
            log = (state_dir / "supervisor.log").read_text(errors="replace")[-3000:]
            raise ClusterError(f"the cluster did not start:\n{log}")
        time.sleep(0.1)
    proc.terminate()
    raise ClusterError(f"the cluster was not up after {timeout:.0f} s (see {state_dir})")


def status(state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any]:
    from gaia.apus.client import replica_status

    state = read_state(state_dir)
    if state is None:
        raise ClusterError("no cluster is up (invoke cluster.up)")
    replicas = {}
    for rid, (host, port) in state["clients"].items():
        try:
            replicas[rid] = replica_status((host, port))
        except OSError as e:
            replicas[rid] = {"id": int(rid), "down": str(e)}
    leaders = {r.get("leader") for r in replicas.values() if "down" not in r}
    leader = leaders.pop() if len(leaders) == 1 else None
    apps = state.get("app_servers", {})
    return {
        **state,
        "leader": leader,
        "leader_address": state["clients"].get(str(leader)) if leader is not None else None,
        # where the replicated app takes clients (None: no app, or no leader right now)
        "leader_app_address": apps.get(str(leader)) if leader is not None else None,
        "replicas": replicas,
    }


def down(state_dir: Path = DEFAULT_STATE_DIR, timeout: float = 30.0) -> bool:
    """Stop the cluster, or clean up after its dead supervisor; False if there was nothing."""
    state, removed = _read(state_dir)
    if state is None:
        return bool(removed)
    pid = int(state["supervisor"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        raise ClusterError(f"supervisor {pid} did not stop within {timeout:.0f} s")
    _state_file(state_dir).unlink(missing_ok=True)
    return True


def _supervise(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = ApusCluster(
        args.replicas,
        args.state_dir / "logs",
        transport=args.transport,
        durability=args.durability,
        data_root=args.state_dir / "data",
        app=args.app,
        isolation=args.isolation,
    )
    cluster.start()
    try:
        identities = {p.name: ProcessIdentity.of(p.pid) for p in cluster.servers}
        state = {
            "supervisor": os.getpid(),
            "system": cluster.name,
            "cluster_id": cluster.cluster_id,
            "network_id": cluster.network_id,
            "isolation": cluster.describe()["isolation"],
            "describe": dict(cluster.describe()),
            "clients": {str(i): list(a) for i, a in cluster.addresses.items()},
            "app": args.app or None,
            "app_servers": {str(i): list(a) for i, a in cluster.app_addresses.items()}
            if args.app
            else {},
            "processes": {
                name: {"pid": i.pid, "start": i.start}
                for name, i in identities.items()
                if i is not None
            },
            "logs": str((args.state_dir / "logs").resolve()),
        }
        tmp = _state_file(args.state_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.rename(_state_file(args.state_dir))
        while not stop.wait(0.5):
            if not any(p.running() for p in cluster.servers):
                break
    finally:
        cluster.stop()
        _state_file(args.state_dir).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gaia.cluster.local")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="supervise a cluster until SIGTERM (cluster.up uses this)")
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    run.add_argument("--replicas", type=int, default=3)
    run.add_argument("--transport", default="shm")
    run.add_argument("--durability", default="memory")
    run.add_argument("--app", default="", help="redis or memcached: replicate that server")
    run.add_argument("--isolation", default="auto", choices=netns.REQUESTS)
    return _supervise(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
