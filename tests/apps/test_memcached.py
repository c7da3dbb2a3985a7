"""memcached, unmodified and multithreaded (-t 2), replicated by APUS: what the clients stored
through the leader, every replica's own memcached returns.

Concurrent clients write disjoint keys and counters: with two worker threads the order in which
a backup's memcached executes inputs read from different connections is its scheduler's, not
the log's, so conflicting writes from concurrent connections could legitimately end (and
answer) differently; the output checker would see that. Disjoint keys answer alike."""

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
