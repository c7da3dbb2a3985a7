"""memcached, unmodified and multithreaded (-t 2), replicated by APUS: what the clients stored
through the leader, every replica's own memcached returns, even where concurrent clients on
both worker threads write the same keys (the shim runs inputs in log order on every replica,
whichever thread reads them)."""

from __future__ import annotations

import threading

import pytest
from pymemcache.client.base import Client

from gaia.apus.client import query_app

from .conftest import MakeCluster, caught_up, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLIENTS = 4
KEYS = [f"c{c}:key{k}" for c in range(CLIENTS) for k in range(10)]


def test_every_replica_returns_what_the_leader_stored(app_cluster: MakeCluster) -> None:
    cluster = app_cluster("memcached")
    leader = cluster.leader()
    assert leader is not None
    host, port = cluster.app_addresses[leader]

    def client_work(c: int) -> None:  # several connections at once: both worker threads busy
        mc = Client((host, port), default_noreply=False, timeout=10)
        for k in range(150):
            mc.set(f"c{c}:key{k % 10}", f"c{c}-{k}".encode())
            mc.incr(f"c{c}:hits", 1)
        mc.close()

    mc = Client((host, port), default_noreply=False)
    for c in range(CLIENTS):
        mc.add(f"c{c}:hits", b"0")
    threads = [threading.Thread(target=client_work, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(mc.get(k) is not None for k in KEYS)
    assert all(mc.get(f"c{c}:hits") == b"150" for c in range(CLIENTS))

    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    hits = [f"c{c}:hits" for c in range(CLIENTS)]
    request = ("get " + " ".join(hits + KEYS) + "\r\n").encode()
    replies = {i: query_app(cluster.addresses[i], request) for i in cluster.addresses}
    assert replies[leader].endswith(b"END\r\n")
    assert replies[leader].count(b"VALUE") == len(KEYS) + CLIENTS
    assert len(set(replies.values())) == 1, {i: r[:200] for i, r in replies.items()}
    checks = (cluster.statuses()[leader] or {})["app"]["output_checks"]
    assert checks.get("agree", 0) >= 1, checks  # (no_majority: a late answer, not a verdict)
    assert not {"minority_differs", "leader_differs"} & set(checks), checks


def test_conflicting_writes_from_both_worker_threads_end_alike_everywhere(
    app_cluster: MakeCluster,
) -> None:
    """Four clients (two per worker thread) append to the same keys at once: the result
    depends on the order the appends execute in, so the replicas agree only if each runs them
    in the log's order rather than in the order its two threads happen to."""
    cluster = app_cluster("memcached")
    leader = cluster.leader()
    assert leader is not None
    host, port = cluster.app_addresses[leader]
    shared = [f"shared{k}" for k in range(3)]
    mc = Client((host, port), default_noreply=False)
    for key in shared:
        mc.set(key, b"")

    def client_work(c: int) -> None:
        mine = Client((host, port), default_noreply=False, timeout=10)
        for k in range(120):
            mine.append(shared[k % len(shared)], f"{c}.{k};".encode())
        mine.close()

    threads = [threading.Thread(target=client_work, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    values = [mc.get(key) for key in shared]
    assert all(v is not None and v.count(b";") == CLIENTS * 120 // len(shared) for v in values)

    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    request = ("get " + " ".join(shared) + "\r\n").encode()
    replies = {i: query_app(cluster.addresses[i], request) for i in cluster.addresses}
    assert len(set(replies.values())) == 1, {i: r[-120:] for i, r in replies.items()}
    status = cluster.statuses()[leader] or {}
    checks = status["app"]["output_checks"]
    assert not {"minority_differs", "leader_differs"} & set(checks), checks
    assert status["app"]["shim"]["out_of_order"] == 0
