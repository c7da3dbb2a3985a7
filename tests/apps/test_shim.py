"""The shim is built from source on demand, and refuses to let a server run unreplicated when
the segment it was pointed at is missing or of another layout."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest

from gaia.apus.config import ClusterConfig, ConfigError
from gaia.apus.interpose.build import shim_library
from gaia.apus.interpose.segment import AppSegment, L

from .conftest import wait_until


def run_preloaded(segment: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=segment)
    return subprocess.run(
        ["true"], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_build_is_cached_by_source_version(tmp_path: Path) -> None:
    first = shim_library(tmp_path)
    assert first.exists() and first.stat().st_size > 0
    assert shim_library(tmp_path) == first


def test_a_missing_segment_stops_the_server() -> None:
    done = run_preloaded("/gaia.nosuchcluster.app0")
    assert done.returncode == 70
    assert "refusing to run unreplicated" in done.stderr


def test_a_segment_of_another_layout_stops_the_server() -> None:
    segment = AppSegment("shimtest", 0, 1024)
    try:
        segment.mem[0:8] = b"NOTGAIA!"
        done = run_preloaded(segment.name)
    finally:
        segment.close()
    assert done.returncode == 70
    assert "does not match" in done.stderr
    assert not segment.path.exists()


def test_without_a_segment_the_shim_stays_out_of_the_way() -> None:
    env = dict(os.environ, LD_PRELOAD=str(shim_library()))
    env.pop("GAIA_SHIM_SEGMENT", None)
    done = subprocess.run(
        ["echo", "hi"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0 and done.stdout == "hi\n" and done.stderr == ""


def test_the_layout_is_read_from_the_c_header() -> None:
    assert L["GAIA_SLOT_SIZE"] == L["GAIA_SLOT_DATA"] + L["GAIA_DATA_CAP"]
    slots, conns = L["GAIA_SLOTS"] * L["GAIA_SLOT_SIZE"], L["GAIA_CONNS"] * L["GAIA_CONN_SIZE"]
    turns = L["GAIA_TURNS"] * L["GAIA_TURN_SIZE"]
    assert L["GAIA_SEGMENT_SIZE"] == L["GAIA_HDR_SIZE"] + slots + conns + turns
    assert L["GAIA_MAGIC"].to_bytes(8, "little") == b"GAIASHM1"


@pytest.mark.parametrize(
    ("app", "ports", "message"),
    [("postgres", 1, "choose one of redis, memcached"), ("redis", 0, "have no app_port")],
)
def test_bad_app_settings_are_refused(tmp_path: Path, app: str, ports: int, message: str) -> None:
    raw = {
        "cluster_id": "c1", "transport": "shm", "durability": "memory", "data_dir": str(tmp_path),
        "members": {"0": {"host": "::1", "peer_port": 1, "client_port": 2, "app_port": ports}},
        "app": app,
    }  # fmt: skip
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.load(path)


def _submit(segment: AppSegment, slot: int, seq: int, payload: bytes) -> None:
    base = L["GAIA_SLOTS_OFFSET"] + slot * L["GAIA_SLOT_SIZE"]
    fields = {"KIND": L["GAIA_KIND_DATA"], "CONN": slot, "LEN": len(payload), "SEQ": seq}
    for name, value in fields.items():
        segment.mem[base + L[f"GAIA_SLOT_{name}"] : base + L[f"GAIA_SLOT_{name}"] + 4] = (
            value.to_bytes(4, "little")
        )
    data = base + L["GAIA_SLOT_DATA"]
    segment.mem[data : data + len(payload)] = payload
    state = base + L["GAIA_SLOT_STATE"]
    segment.mem[state : state + 4] = L["GAIA_SLOT_SUBMITTED"].to_bytes(4, "little")


def test_inputs_are_taken_in_submission_order_across_the_sequence_wrap() -> None:
    segment = AppSegment("shimorder", 0, 1024)
    try:
        # slot order is not submission order; the sequence numbers wrap past 2**32
        for slot, seq, payload in [(0, 1, b"c"), (3, 2**32 - 1, b"a"), (7, 0, b"b"), (9, 2, b"d")]:
            _submit(segment, slot, seq, payload)
        assert [i.payload for i in segment.take()] == [b"a", b"b", b"c", b"d"]
        assert segment.take() == []  # each is taken once
    finally:
        segment.close()


EPOLL_SERVER = """
import os, select, socket
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
ep = select.epoll()
ep.register(srv.fileno(), select.EPOLLIN)
conns = {}
while True:
    for fd, _ in ep.poll():
        if fd == srv.fileno():
            c, peer = srv.accept()
            c.setblocking(False)
            ep.register(c.fileno(), select.EPOLLIN)
            conns[c.fileno()] = (c, peer[1])
            continue
"""
"""A Python epoll server for the shim to sit in; a test appends what it does with a readable
connection `fd` (indented for the loop's body)."""

ECHO_SERVER = EPOLL_SERVER + """
        try:
            data = os.read(fd, 3)  # less than a client sends: the rest waits in the shim
        except ConnectionResetError:
            data = b""
        if data:
            os.write(fd, data)
        else:
            ep.unregister(fd)
            conns.pop(fd)[0].close()
            print("closed", flush=True)
"""


class StandInDaemon:
    """Plays the replica daemon for one shim: commits (or loses) what it submits, in order."""

    def __init__(self, segment: AppSegment) -> None:
        self.segment = segment
        self.taken: list[tuple[int, bytes]] = []
        self.commit = True
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.segment.beat()
            seen = self.segment.doorbell()
            inputs = self.segment.take()
            for i in inputs:
                self.taken.append((i.kind, i.payload))
                data = i.kind == L["GAIA_KIND_DATA"]
                lose = data and not self.commit
                order = self.segment.next_order() if data else None  # numbered as it logs them
                self.segment.answer(i.slot, not lose, index=len(self.taken), order=order)
            if not inputs:
                self.segment.wait(seen, 0.01)

    def data(self) -> list[bytes]:
        return [p for kind, p in self.taken if kind == L["GAIA_KIND_DATA"]]


def _shut(
    server: subprocess.Popen[str],
    segment: AppSegment,
    socks: Sequence[socket.socket] = (),
    daemon: StandInDaemon | None = None,
) -> None:
    """A shim test's end: the test's connections, the server, the stand-in daemon, then the
    segment."""
    for sock in socks:
        sock.close()
    server.kill()
    server.wait()
    if daemon is not None:
        daemon.stop.set()
        daemon.thread.join(timeout=5)
    segment.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_input_agreed_at_epoll_wait_reaches_a_server_that_reads_less_of_it() -> None:
    segment = AppSegment("shimahead", 0, 1024)
    segment.open_orders()
    segment.role = L["GAIA_ROLE_LEADER"]
    daemon = StandInDaemon(segment)
    env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=segment.name)
    server = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"hello world")
            # one input agreed ahead, handed over 3 bytes a read: still readable when the
            # kernel no longer holds any of it
            assert _recv_exactly(client, 11) == b"hello world"
            client.sendall(b"abcdef")
            assert _recv_exactly(client, 6) == b"abcdef"
            assert b"".join(daemon.data()) == b"hello worldabcdef"
            assert daemon.data()[0] == b"hello world"
            counters = segment.counters()
            assert counters["calls"] == 4 + 2 and counters["input_bytes"] == 17
            assert counters["ahead"] == len(daemon.data()) and counters["lost"] == 0

            daemon.commit = False  # an input that is not committed never reaches the server
            client.sendall(b"xyz")
            assert client.recv(16) == b""  # the server failed that read and hung up
        assert server.stdout.readline().strip() == "closed"
        assert segment.counters()["lost"] == 1
        kinds = [kind for kind, _ in daemon.taken]
        assert kinds[0] == L["GAIA_KIND_CONNECT"] and kinds[-1] == L["GAIA_KIND_CLOSE"]
    finally:
        _shut(server, segment, daemon=daemon)


RECORDING_SERVER = EPOLL_SERVER + """
        try:
            data = os.read(fd, 100)
        except BlockingIOError:
            continue  # not its turn: it stays readable, the loop comes back to it
        print(conns[fd][1], data.decode(), flush=True)
"""


def _lines(stream: IO[str], count: int, timeout: float = 10.0) -> list[str]:
    """The next `count` lines the server prints; fails (rather than hangs) if they do not come."""
    got: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [got.put(stream.readline()) for _ in range(count)], daemon=True
    ).start()
    try:
        return [got.get(timeout=timeout) for _ in range(count)]
    except queue.Empty:
        raise AssertionError(
            f"the server printed fewer than {count} lines in {timeout:g} s"
        ) from None


def test_a_backup_server_reads_its_replay_connections_in_turn_order() -> None:
    """Input that arrives first is still read after the input announced before it, and a read
    never runs into the connection's next turn, whatever order the bytes arrive in."""
    segment = AppSegment("shimturns", 0, 1024)
    segment.role = L["GAIA_ROLE_BACKUP"]
    env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=segment.name)
    server = subprocess.Popen(
        [sys.executable, "-c", RECORDING_SERVER], env=env, stdout=subprocess.PIPE, text=True
    )
    socks: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        entries = {}
        for name in ("a", "b"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            entries[name] = segment.register_replay(sock.getsockname()[1], ordered=True)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        a, b = socks
        for name, data in (("b", b"b1"), ("a", b"a1"), ("b", b"b2")):
            assert segment.announce_turn(entries[name], len(data))
        a.sendall(b"a1")  # first to arrive, second in turn
        time.sleep(0.2)
        b.sendall(b"b1b2")  # both of b's turns at once: read apart
        lines = [line.split() for line in _lines(server.stdout, 3)]
        ports = {str(s.getsockname()[1]): name for name, s in zip("ab", socks, strict=True)}
        assert [(ports[p], data) for p, data in lines] == [("b", "b1"), ("a", "a1"), ("b", "b2")]
        wait_until(lambda: segment.turns_pending() == 0, what="the server back in epoll_wait")
        assert segment.counters()["out_of_turn"] >= 1  # a's early read was refused
    finally:
        _shut(server, segment, socks)


TWO_THREAD_SERVER = """
import os, select, socket, sys, threading, time
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
say = threading.Lock()

def serve(name, conn):  # one event loop per thread, as memcached's workers
    conn.setblocking(False)
    ep = select.epoll()
    ep.register(conn.fileno(), select.EPOLLIN)
    while True:
        for fd, _ in ep.poll():
            try:
                data = os.read(fd, 100)
            except BlockingIOError:
                continue  # not its turn yet
            if not data:
                return
            with say:
                print(name, "read", data.decode(), flush=True)
            if name == "a":
                time.sleep(0.3)  # a slow command: the other thread's input must wait for it
            with say:
                print(name, "done", data.decode(), flush=True)

threads = []
for name in ("a", "b"):
    conn, _ = srv.accept()
    threads.append(threading.Thread(target=serve, args=(name, conn)))
    threads[-1].start()
print("serving", flush=True)
for t in threads:
    t.join()
"""
"""A server whose two threads each own one connection, and thread a takes 0.3 s per input."""


def _two_thread_server(segment: AppSegment) -> subprocess.Popen[str]:
    env = dict(os.environ, LD_PRELOAD=str(shim_library()), GAIA_SHIM_SEGMENT=segment.name)
    return subprocess.Popen(
        [sys.executable, "-c", TWO_THREAD_SERVER], env=env, stdout=subprocess.PIPE, text=True
    )


def test_a_backup_runs_the_next_turn_only_once_the_thread_of_the_last_is_back() -> None:
    """Thread a reads its turn and works on it; thread b's input, next in turn and already
    there, is read only once a is back for more: the inputs execute in log order, not in the
    order two threads happen to run them."""
    segment = AppSegment("shimexecb", 0, 1024)
    segment.role = L["GAIA_ROLE_BACKUP"]
    server = _two_thread_server(segment)
    socks: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        for data in (b"a1", b"b1"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            entry = segment.register_replay(sock.getsockname()[1], ordered=True)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
            assert segment.announce_turn(entry, len(data))
        assert _lines(server.stdout, 1) == ["serving\n"]
        for sock, data in zip(socks, (b"a1", b"b1"), strict=True):
            sock.sendall(data)
        lines = [line.strip() for line in _lines(server.stdout, 4)]
        assert lines == ["a read a1", "a done a1", "b read b1", "b done b1"]
    finally:
        _shut(server, segment, socks)


def test_a_leader_hands_over_inputs_in_log_order_once_the_one_before_has_executed() -> None:
    """a's input is agreed first and its thread works on it for 0.3 s; b's, agreed next, is
    handed to thread b only once a is back for more: the leader executes in the order the
    backups replay, whichever thread reads what."""
    segment = AppSegment("shimexecl", 0, 1024)
    segment.open_orders()
    segment.role = L["GAIA_ROLE_LEADER"]
    daemon = StandInDaemon(segment)
    server = _two_thread_server(segment)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as a,
            socket.create_connection(("127.0.0.1", port), timeout=10) as b,
        ):
            assert _lines(server.stdout, 1) == ["serving\n"]
            a.sendall(b"a1")
            assert _lines(server.stdout, 1) == ["a read a1\n"]
            b.sendall(b"b1")  # agreed while thread a still works on a1
            lines = [line.strip() for line in _lines(server.stdout, 3)]
            assert lines == ["a done a1", "b read b1", "b done b1"]
            assert daemon.data() == [b"a1", b"b1"]
            assert segment.counters()["out_of_order"] == 0
    finally:
        _shut(server, segment, daemon=daemon)
