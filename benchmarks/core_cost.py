"""CPU cost of the APUS core per committed entry: 3 replicas, zero-latency in-process network.

    python benchmarks/core_cost.py [--entries 20000] [--batch 1,8,32] [--replicas 3] [--trials 5]

Everything the replicas' cores do for an entry is counted (leader: propose, encode, ack
reading, commit; backups: slot reading, checksum, persist bookkeeping, ack writing), plus the
harness's byte copies into regions, which stand in for the NIC. `batch` is how many inputs the
leader has in flight per round: 1 is the one-client latency mode, larger batches amortise the
per-round costs (ack reads, commit computation) as concurrent clients do.
Reports the median over trials of CPU µs per committed entry, with the range.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gaia.apus.core.layout import Layout
from gaia.apus.core.replica import LEADER, Replica
from gaia.apus.core.types import CoreConfig, EntryKind, Persist, RemoteWrite


def build(n: int) -> tuple[list[Replica], list[bytearray]]:
    ids = tuple(range(n))
    regions, cores = [], []
    for i in ids:
        cfg = CoreConfig(replica_id=i, members=ids, slots=256, slot_size=1024, seed=1)
        region = bytearray(Layout(cfg).size)
        regions.append(region)
        cores.append(Replica(cfg, memoryview(region)))
    return cores, regions


def pump(cores: list[Replica], regions: list[bytearray]) -> None:
    """Carry out every action at once: writes land, disks complete, and a core reads its memory
    only when something was written into it (as a transport's wait() would wake it)."""
    dirty = set(range(len(cores)))
    while dirty:
        for i in sorted(dirty):
            cores[i].memory_changed()
        dirty.clear()
        for core in cores:
            while actions := core.ready():
                last_seq = 0
                for a in actions:
                    if isinstance(a, RemoteWrite):
                        regions[a.peer][a.offset : a.offset + len(a.data)] = a.data
                        dirty.add(a.peer)
                    elif isinstance(a, Persist):
                        last_seq = a.seq
                if last_seq:
                    core.persist_done(last_seq)


def trial(n: int, entries: int, batch: int) -> float:
    cores, regions = build(n)
    cores[0].campaign()
    for _ in range(20):
        pump(cores, regions)
        for core in cores:
            core.tick()
    leader = cores[0]
    assert leader.role == LEADER
    payload = b"x" * 64
    start_commit = leader.commit
    t0 = time.process_time()
    while leader.commit - start_commit < entries:
        for _ in range(batch):
            leader.propose(EntryKind.DATA, 1, payload)
        pump(cores, regions)
    used = time.process_time() - t0
    return used / (leader.commit - start_commit) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    print(f"{'replicas':>8} {'batch':>5} {'µs CPU / entry (median)':>24} {'range':>16}")
    for batch in (int(b) for b in args.batch.split(",")):
        runs = [trial(args.replicas, args.entries, batch) for _ in range(args.trials)]
        med = statistics.median(runs)
        print(f"{args.replicas:>8} {batch:>5} {med:>24.2f} {min(runs):>7.2f}-{max(runs):<7.2f}")


if __name__ == "__main__":
    main()
