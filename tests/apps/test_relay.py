"""The delaying relay: the delay it adds, bytes intact both ways, half-closes, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gaia.apps.relay import DelayRelay, RelayError

Handler = Callable[[socket.socket], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], tuple[str, int]]]:
    """Start loopback servers that run `handler` on each accepted connection in a thread."""
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> tuple[str, int]:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=_closing(handler, conn), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        host, port = listener.getsockname()
        return host, port

    yield start
    for listener in listeners:
        listener.close()


def _closing(handler: Handler, conn: socket.socket) -> Callable[[], None]:
    def run() -> None:
        with conn:
            handler(conn)

    return run


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trips(sock: socket.socket, count: int, size: int = 40) -> list[float]:
    """Seconds of `count` ping-pongs of `size` bytes through an echoing peer."""
    times = []
    for i in range(count):
        message = bytes([i % 256]) * size
        start = time.perf_counter()
        sock.sendall(message)
        got = b""
        while len(got) < size:
            got += sock.recv(size - len(got))
        times.append(time.perf_counter() - start)
        assert got == message
    return times


def test_round_trips_take_the_added_delay(serve: Callable[[Handler], tuple[str, int]]) -> None:
    target = serve(echo)
    with connect(target) as direct:
        baseline = statistics.median(round_trips(direct, 50))
    rtt_s = 0.004
    with DelayRelay.for_rtt(target, rtt_s * 1e6) as relay, connect(relay.address) as sock:
        delayed = statistics.median(round_trips(sock, 60))
    stats = relay.stats()
    assert stats.connections == 1
    # the relay wakes its timers early by its usual lateness: on time on average, not always
    # more; the upper bound leaves room for a busy 2-core machine
    assert 0.8 * rtt_s <= delayed <= rtt_s + 0.004, (delayed, baseline)
    assert delayed > baseline + 0.5 * rtt_s
    assert stats.to_server.chunks == stats.to_client.chunks == 60
    assert stats.measured_rtt_us is not None
    assert 0.8 * rtt_s * 1e6 <= stats.measured_rtt_us <= (rtt_s + 0.004) * 1e6


def test_bytes_arrive_intact_and_in_order_both_ways_under_flow_control(
    serve: Callable[[Handler], tuple[str, int]],
) -> None:
    target = serve(echo)
    payload = os.urandom(1 << 20)
    received = bytearray()
    with DelayRelay(target, 0.001, max_buffer=16 * 1024) as relay, connect(relay.address) as sock:

        def read_back() -> None:
            while len(received) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=read_back)
        reader.start()
        for start in range(0, len(payload), 7000):  # odd sizes: chunks are not messages
            sock.sendall(payload[start : start + 7000])
        reader.join(timeout=60)
    assert bytes(received) == payload
    stats = relay.stats()
    assert stats.to_server.bytes == stats.to_client.bytes == len(payload)
    assert stats.to_server.paused > 0  # the 16 KiB line filled: its sender was not read


def test_server_first_protocols_and_half_closes_travel_both_ways(
    serve: Callable[[Handler], tuple[str, int]],
) -> None:
    def greet_then_count(conn: socket.socket) -> None:
        conn.sendall(b"hello\n")
        total = 0
        while data := conn.recv(65536):  # until the client's EOF arrives
            total += len(data)
        conn.sendall(f"got {total}\n".encode())

    target = serve(greet_then_count)
    with DelayRelay(target, 0.0005) as relay, connect(relay.address) as sock:
        assert sock.recv(100) == b"hello\n"
        sock.sendall(b"x" * 5000)
        sock.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back
        answer = b""
        while chunk := sock.recv(100):
            answer += chunk
    assert answer == b"got 5000\n"


def test_stop_closes_everything_and_joins(serve: Callable[[Handler], tuple[str, int]]) -> None:
    target = serve(echo)
    relay = DelayRelay.for_rtt(target, 200)
    address = relay.start()
    sock = connect(address)
    round_trips(sock, 3)
    relay.stop()
    # its loop's thread is joined (other tests' threads may come and go meanwhile)
    assert not relay.running
    assert not [t for t in threading.enumerate() if t.name == "delay-relay"]
    with sock, contextlib.suppress(ConnectionResetError):
        assert sock.recv(10) == b""  # the relayed connection is gone
    with pytest.raises(OSError):
        connect(address).close()
    relay.stop()  # idempotent
    with pytest.raises(RelayError, match="not running"):
        _ = relay.address


def test_an_unreachable_target_closes_the_client(
    serve: Callable[[Handler], tuple[str, int]],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        gone = taken.getsockname()
    with DelayRelay(gone, 0.0) as relay, connect(relay.address) as sock:
        sock.sendall(b"anyone?")
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
        deadline = time.monotonic() + 5
        while relay.stats().failed_connects == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert relay.stats().failed_connects == 1


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        relay = DelayRelay(("127.0.0.1", 9), 0.0, listen=taken.getsockname())
        with pytest.raises(RelayError, match="could not listen"):
            relay.start()
    assert not relay.running
