"""Redis, unmodified, replicated by APUS: the shim on the leader agrees on every input before
Redis reads it, the backups replay the log into their own Redis, and all of them end up with
the same dataset (DEBUG DIGEST) and the same output (the output checker agrees)."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest
import redis

from gaia.apus.client import query_app
from gaia.apus.systems import ApusCluster

from .conftest import MakeCluster, caught_up, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DIGEST = b"*2\r\n$5\r\nDEBUG\r\n$6\r\nDIGEST\r\n"


def digests(cluster: ApusCluster, members: list[int] | None = None) -> dict[int, bytes]:
    """Each replica's DEBUG DIGEST, asked of its own Redis outside the log."""
    ids = members if members is not None else list(cluster.addresses)
    return {i: query_app(cluster.addresses[i], DIGEST).strip() for i in ids}


def leader_redis(cluster: ApusCluster) -> redis.Redis:
    leader = cluster.leader()
    assert leader is not None
    host, port = cluster.app_addresses[leader]
    return redis.Redis(host=host, port=port, socket_timeout=10)


def workload(r: redis.Redis, tag: str, n: int) -> None:
    """Commands whose result depends on order: a counter, a list, overwritten keys."""
    for k in range(n):
        r.set(f"{tag}:key:{k % 17}", f"{tag}-{k}")
        r.incr(f"{tag}:counter")
        r.rpush(f"{tag}:list", k)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_backups_hold_the_leaders_dataset(app_cluster: MakeCluster, transport: str) -> None:
    cluster = app_cluster("redis", transport=transport)
    r = leader_redis(cluster)
    workload(r, "a", 200)
    pipe = r.pipeline(transaction=False)  # several commands in one read: one entry
    for _ in range(50):
        pipe.incr("a:counter")
    pipe.execute()
    assert r.get("a:counter") == b"250"

    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    seen = digests(cluster)
    assert len(set(seen.values())) == 1, seen
    assert seen[0] != b"+" + b"0" * 40  # not three empty datasets

    statuses = cluster.statuses()
    leader = statuses[cluster.leader() or 0]
    assert leader is not None
    app = leader["app"]
    assert app["shim"]["calls"] >= 602 and app["shim"]["lost"] == 0  # pipeline: few reads
    checks = app["output_checks"]
    assert checks.get("agree", 0) >= 1, checks  # (no_majority: a late answer, not a verdict)
    assert not {"minority_differs", "leader_differs"} & set(checks), checks


def test_concurrent_clients_are_agreed_in_batches_and_replayed_alike(
    app_cluster: MakeCluster,
) -> None:
    """Clients ready together are agreed together (the shim's batch at epoll_wait, one BATCH
    entry), values larger than a log slot arrive in several reads, and the order of appends
    from different clients to one key is the same on every replica."""
    # a loaded machine must not stall a heartbeat into an election: this test is about replay
    cluster = app_cluster("redis", timing={"election_ticks": 3000})
    failures: list[BaseException] = []

    def client(k: int) -> None:
        try:
            r = leader_redis(cluster)
            for j in range(40):
                r.set(f"big:{k}:{j % 5}", bytes([65 + k]) * (3000 + 1997 * j % 20000))
                r.incr("shared")
                r.append("order", f"{k}.{j};")
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert leader_redis(cluster).get("shared") == b"480"

    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    seen = digests(cluster)
    assert len(set(seen.values())) == 1, seen
    leader = cluster.statuses()[cluster.leader() or 0]
    assert leader is not None
    shim = leader["app"]["shim"]
    assert shim["ahead"] > 0 and shim["rounds"] < shim["calls"], shim  # batched
    assert shim["lost"] == 0 and shim["discarded_bytes"] == 0, shim
    assert leader["app"]["proposed"].get("batch_entries", 0) > 0, leader["app"]["proposed"]
    checks = leader["app"]["output_checks"]
    assert not {"minority_differs", "leader_differs"} & set(checks), checks


def test_a_backup_refuses_clients(app_cluster: MakeCluster) -> None:
    cluster = app_cluster("redis")
    leader = cluster.leader()
    backup = next(i for i in cluster.app_addresses if i != leader)
    with socket.create_connection(cluster.app_addresses[backup], timeout=5) as sock:
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\n1\r\n")
        try:
            answer = sock.recv(100)
        except ConnectionResetError:  # closed with our bytes unread
            answer = b""
        assert answer == b""  # closed by the shim before Redis saw a byte
    wait_until(lambda: caught_up(cluster))
    assert len(set(digests(cluster).values())) == 1


def test_leader_failover_keeps_every_acknowledged_write(app_cluster: MakeCluster) -> None:
    cluster = app_cluster("redis")
    old = cluster.leader()
    assert old is not None
    r = leader_redis(cluster)
    acknowledged: list[int] = []
    failure: list[Exception] = []
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            try:
                r.rpush("log", k)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                failure.append(e)
                return  # the leader died under us: k may or may not be in
            acknowledged.append(k)
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    wait_until(lambda: len(acknowledged) >= 100 or bool(failure), what="writes before the crash")
    assert not failure, failure  # the leader was still up
    cluster.kill(old)
    thread.join(timeout=30)
    stop.set()

    survivors = [i for i in cluster.app_addresses if i != old]
    wait_until(lambda: cluster.leader() in survivors, timeout=30, what="a new leader")
    wait_until(
        lambda: any(s and s["app"]["serving"] for s in cluster.statuses().values()),
        what="the new leader's Redis serves",
    )
    r2 = leader_redis(cluster)
    stored = [int(x) for x in r2.lrange("log", 0, -1)]
    assert stored[: len(acknowledged)] == acknowledged  # all acknowledged, in order
    assert len(stored) <= len(acknowledged) + 1  # at most the one in flight at the crash
    r2.rpush("log", "after")  # the new leader serves writes
    wait_until(lambda: caught_up(cluster, survivors))
    assert len(set(digests(cluster, survivors).values())) == 1

    cluster.restart(old)  # the old leader comes back as a backup, replays the whole log
    wait_until(lambda: caught_up(cluster), timeout=40, what="the old leader caught up")
    assert len(set(digests(cluster).values())) == 1


def test_a_diverged_backup_is_found_and_restored_from_its_checkpoint(
    app_cluster: MakeCluster,
) -> None:
    """Corrupt one backup's Redis behind APUS' back: the output checker sees its replies differ
    from the leader's, and the guard restarts it from its last checkpoint and replays the log."""
    cluster = app_cluster("redis", output_period=4, checkpoint_every=50)
    r = leader_redis(cluster)
    workload(r, "a", 40)  # 120 commands: backups checkpoint
    leader = cluster.leader()
    victim = next(i for i in cluster.addresses if i != leader)
    wait_until(
        lambda: (cluster.statuses()[victim] or {}).get("app", {}).get("checkpoint_index"),
        what="a checkpoint on the victim",
    )
    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    # a write outside the log: only the victim's Redis has it
    query_app(cluster.addresses[victim], b"*3\r\n$3\r\nSET\r\n$5\r\nb:key\r\n$7\r\ncorrupt\r\n")
    assert len(set(digests(cluster).values())) == 2
    for _ in range(8):  # the victim's GET b:key answers differ, the next OUTPUT entry shows it
        r.get("b:key")
    wait_until(
        lambda: (cluster.statuses()[victim] or {}).get("app", {}).get("restores", 0) >= 1,
        what="the victim restored",
    )
    r.set("c:after", "restore")
    wait_until(lambda: caught_up(cluster), what="everyone caught up")
    assert len(set(digests(cluster).values())) == 1


def test_a_leader_whose_output_differs_steps_down_and_is_restored(
    app_cluster: MakeCluster,
) -> None:
    """Corrupt the leader's own Redis behind APUS' back: the backups' answers to the next
    output check outvote it, so it stops leading, another replica is elected, and the old
    leader rebuilds its server from the log; in the end every replica holds the same data."""
    cluster = app_cluster("redis", output_period=4, timing={"election_ticks": 200})
    r = leader_redis(cluster)
    workload(r, "a", 20)
    old = cluster.leader()
    assert old is not None
    wait_until(lambda: caught_up(cluster), what="backups replayed the log")
    query_app(cluster.addresses[old], b"*3\r\n$3\r\nSET\r\n$5\r\nb:key\r\n$7\r\ncorrupt\r\n")
    with contextlib.suppress(redis.ConnectionError):  # dropped once it steps down
        for _ in range(8):  # its GET b:key answers differ, the next OUTPUT entry shows it
            r.get("b:key")
    wait_until(lambda: cluster.leader() not in (None, old), timeout=30, what="a new leader")
    wait_until(
        lambda: (cluster.statuses()[old] or {}).get("app", {}).get("restores", 0) >= 1,
        what="the old leader restored",
    )
    new = leader_redis(cluster)
    new.set("c:after", "restore")
    assert new.get("b:key") is None  # the corrupt write never was in the log
    wait_until(lambda: caught_up(cluster), what="everyone caught up")
    assert len(set(digests(cluster).values())) == 1


def test_a_restarted_backup_starts_from_its_checkpoint(app_cluster: MakeCluster) -> None:
    cluster = app_cluster("redis", checkpoint_every=40, durability="fsync")
    r = leader_redis(cluster)
    workload(r, "a", 40)
    leader = cluster.leader()
    backup = next(i for i in cluster.addresses if i != leader)
    wait_until(
        lambda: (
            ((cluster.statuses()[backup] or {}).get("app", {}).get("checkpoint_index") or 0) >= 80
        ),
        what="a checkpoint on the backup",
    )
    cluster.kill(backup)
    workload(r, "b", 20)  # the majority goes on without it
    cluster.restart(backup)
    wait_until(lambda: caught_up(cluster), timeout=40, what="the backup caught up")
    app = (cluster.statuses()[backup] or {})["app"]
    assert app["started_from"] >= 80  # not replayed from the start of the log
    assert len(set(digests(cluster).values())) == 1
