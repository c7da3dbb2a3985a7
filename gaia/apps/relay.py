"""A user-space delaying TCP relay: the client network that netem would emulate, without netem.

    python -m gaia.apps.relay --target 127.0.0.1:6379 --rtt-us 301 [--listen 127.0.0.1:0]

The APUS and TRIPOD evaluations ran their load generators on a machine 301 µs (ping) away from
the servers; this kernel has no netem, so the experiments put this relay between the load tool
and the server (the unreplicated baseline and the replicated leader alike). Every accepted
client connection gets its own connection to the target, and each direction is one delay
line: a chunk read from one side is held until `arrival + one_way_delay` and then written to
the other side. The line is a queue of (due time, bytes) drained in arrival order, so bytes are
never reordered and the delay does not grow with load; chunks that fall due together go out in
one write.

- Half-closes travel like data: an EOF from one side reaches the other side after the same
  delay (after every byte before it), and a connection ends once both directions have.
- Buffers are bounded: a side is not read while its delay line plus the other side's unsent
  write buffer hold more than `max_buffer` bytes, so TCP flow control pushes back on a sender
  that outruns its receiver.
- Timers are precise to microseconds: asyncio's default epoll selector rounds every wait up to
  a whole millisecond, which would turn a 150 µs delay into 1 ms, so the loop runs on
  `select()` (microsecond timeouts; the relay serves a handful of connections), asks the
  kernel for 1 µs timer slack on its thread, and sets its timers early by the loop's usual
  (median) lateness, so that chunks typically get the delay asked for.
- A network does not wait for CPU behind the servers it connects: where allowed (root), the
  relay's thread runs at nice -10, so that busy replica daemons on a small machine do not
  delay the replicated system's packets more than the baseline's.
- `stop()` closes the listening socket and every relayed connection, cancels the pending
  deliveries and joins the loop's thread; the relay is also a context manager.

`stats()` reports connections, bytes each way and the delay chunks actually got (the mean is
what the load tool saw added, minus the relay's own processing before a chunk is stamped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

DEFAULT_MAX_BUFFER = 1 << 20
"""Bytes a direction may hold (delay line + the receiving side's write buffer) before the
relay stops reading its sender."""

_PR_SET_TIMERSLACK = 29
_TIMER_SLACK_NS = 1_000
_NICE = -10


class RelayError(RuntimeError):
    """The relay could not start (the listening address is taken, the loop failed)."""


@dataclass
class DirectionStats:
    """One direction, summed over every connection: what went through and how late."""

    chunks: int = 0
    bytes: int = 0
    delay_sum_s: float = 0.0
    delay_max_s: float = 0.0
    paused: int = 0  # how often its sender was not read because the direction was full

    @property
    def mean_delay_us(self) -> float | None:
        return self.delay_sum_s / self.chunks * 1e6 if self.chunks else None


@dataclass
class RelayStats:
    """What a relay did, for the run's logs and the trial's row."""

    one_way_delay_us: float
    connections: int = 0
    failed_connects: int = 0
    to_server: DirectionStats = field(default_factory=DirectionStats)
    to_client: DirectionStats = field(default_factory=DirectionStats)

    @property
    def measured_rtt_us(self) -> float | None:
        """The mean delay a request and its answer got together (None before both moved)."""
        up, down = self.to_server.mean_delay_us, self.to_client.mean_delay_us
        return None if up is None or down is None else up + down

    def as_dict(self) -> dict[str, object]:
        def direction(d: DirectionStats) -> dict[str, object]:
            return {
                "chunks": d.chunks,
                "bytes": d.bytes,
                "mean_delay_us": d.mean_delay_us,
                "max_delay_us": d.delay_max_s * 1e6,
                "paused": d.paused,
            }

        return {
            "one_way_delay_us": self.one_way_delay_us,
            "connections": self.connections,
            "failed_connects": self.failed_connects,
            "to_server": direction(self.to_server),
            "to_client": direction(self.to_client),
            "measured_rtt_us": self.measured_rtt_us,
        }


class _Waking:
    """How late the loop wakes up for a timer (select() return, scheduling on a busy machine),
    tracked as a running median (a step towards each observation, so that one stall of
    milliseconds does not throw it off): timers are set that much early, so the delay chunks
    get is the one asked for in the typical case rather than always more. Never more than half
    the delay itself."""

    STEP_S = 2e-6

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.late_s = 0.0

    @property
    def lead_s(self) -> float:
        return min(self.late_s, self.delay_s / 2)

    def observe(self, late_s: float) -> None:
        if late_s > self.late_s:
            self.late_s += self.STEP_S
        elif self.late_s >= self.STEP_S:
            self.late_s -= self.STEP_S


class _Line:
    """One direction of one relayed connection: the delay line from `source` to `sink`."""

    def __init__(self, pair: _Pair, stats: DirectionStats) -> None:
        self.pair = pair
        self.stats = stats
        self.queue: deque[tuple[float, bytes | None]] = deque()  # (due, data; None: EOF)
        self.queued = 0
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.open = False  # the sink is connected (the target side only once connected)
        self.sink_full = False  # the sink's transport asked us to stop writing
        self.reading = True
        self.timer: asyncio.TimerHandle | None = None
        self.wake_at = 0.0
        self.ended = False  # EOF delivered to the sink, or the sink is gone

    def push(self, data: bytes | None) -> None:
        if self.ended:
            return
        self.queue.append((self.pair.loop.time() + self.pair.delay_s, data))
        self.queued += len(data) if data else 0
        self.kick()
        self.flow()

    def kick(self) -> None:
        """Wake up when the first chunk falls due (if the sink can take it), early by the
        loop's usual lateness so that chunks go out on time on average."""
        if self.timer is None and self.open and self.queue:
            self.wake_at = self.queue[0][0] - self.pair.waking.lead_s
            self.timer = self.pair.loop.call_at(self.wake_at, self.deliver)

    def deliver(self) -> None:
        """Write every chunk that is due, in order, in one write; then wait for the next."""
        self.timer = None
        now = self.pair.loop.time()
        waking = self.pair.waking
        waking.observe(now - self.wake_at)
        chunks: list[bytes] = []
        eof = False
        while self.queue and self.queue[0][0] <= now + waking.lead_s:
            due, data = self.queue.popleft()
            if data is None:
                eof = True
                break
            delay = now - due + self.pair.delay_s
            self.queued -= len(data)
            self.stats.chunks += 1
            self.stats.bytes += len(data)
            self.stats.delay_sum_s += delay
            self.stats.delay_max_s = max(self.stats.delay_max_s, delay)
            chunks.append(data)
        sink = self.sink
        if sink is not None and not sink.is_closing():
            if chunks:
                sink.write(b"".join(chunks))
            if eof:
                if sink.can_write_eof():
                    sink.write_eof()
                else:
                    sink.close()
        if eof:
            self.end()
            return
        self.kick()
        self.flow()

    def end(self) -> None:
        """Nothing more goes this way (EOF delivered, or the sink is gone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0
        self.ended = True
        self.pair.maybe_close()

    def flow(self) -> None:
        """Read the source only while this direction has room: its delay line holds at most
        about `max_buffer` bytes, and nothing is read while the sink's transport is full."""
        source = self.source
        if source is None or source.is_closing():
            return
        full = self.sink_full or self.queued > self.pair.max_buffer
        if self.reading and full:
            source.pause_reading()
            self.reading = False
            self.stats.paused += 1
        elif not self.reading and not self.sink_full and self.queued <= self.pair.max_buffer // 2:
            source.resume_reading()
            self.reading = True


class _Side(asyncio.Protocol):
    """One socket of a relayed connection (the client's or the target's)."""

    def __init__(self, pair: _Pair, outgoing: _Line, incoming: _Line) -> None:
        self.pair = pair
        self.outgoing = outgoing  # what this side sends travels on this line
        self.incoming = incoming  # and what it receives arrives on this one
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.outgoing.source = transport
        self.incoming.sink = transport
        self.incoming.open = True
        self.incoming.kick()

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.outgoing.push(None)
        return True  # keep the socket open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof:  # reset or closed under us: the peer gets an EOF after the delay
            self.eof = True
            self.outgoing.push(None)
        self.outgoing.source = None
        self.incoming.sink = None
        self.incoming.end()  # nothing more can be delivered to this side

    def pause_writing(self) -> None:
        self.incoming.sink_full = True
        self.incoming.flow()

    def resume_writing(self) -> None:
        self.incoming.sink_full = False
        self.incoming.flow()


class _Pair:
    """A client connection and its connection to the target, with a line each way."""

    def __init__(self, relay: DelayRelay, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.delay_s = relay.one_way_delay_s
        self.max_buffer = relay.max_buffer
        self.waking = relay.waking
        self.to_server = _Line(self, relay.stats_now.to_server)
        self.to_client = _Line(self, relay.stats_now.to_client)
        self.client = _Side(self, outgoing=self.to_server, incoming=self.to_client)
        self.server = _Side(self, outgoing=self.to_client, incoming=self.to_server)
        self.on_close: Callable[[_Pair], None] = lambda pair: None
        self.closed = False

    def maybe_close(self) -> None:
        """A connection ends once both of its directions have."""
        if not self.closed and self.to_server.ended and self.to_client.ended:
            self.close()

    def close(self) -> None:
        self.closed = True
        for line in (self.to_server, self.to_client):
            if line.timer is not None:
                line.timer.cancel()
                line.timer = None
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.on_close(self)


class DelayRelay:
    """Relay TCP connections from a local port to `target`, `one_way_delay_s` each way."""

    def __init__(
        self,
        target: tuple[str, int],
        one_way_delay_s: float,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if one_way_delay_s < 0:
            raise ValueError(f"the delay must be >= 0, not {one_way_delay_s}")
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, not {max_buffer}")
        self.target = target
        self.one_way_delay_s = one_way_delay_s
        self.listen = listen
        self.max_buffer = max_buffer
        self.stats_now = RelayStats(one_way_delay_s * 1e6)
        self.waking = _Waking(one_way_delay_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._address: tuple[str, int] | None = None

    @classmethod
    def for_rtt(
        cls,
        target: tuple[str, int],
        rtt_us: float,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> DelayRelay:
        """A relay adding `rtt_us` to every round trip: half of it in each direction."""
        return cls(target, rtt_us / 2 / 1e6, listen=listen, max_buffer=max_buffer)

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the listening port is chosen at start when it was 0)."""
        if self._address is None:
            raise RelayError("the relay is not running")
        return self._address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> tuple[str, int]:
        if self._thread is not None:
            raise RelayError("the relay was already started")
        started: list[BaseException | tuple[str, int]] = []
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started, ready), name="delay-relay", daemon=True
        )
        self._thread.start()
        ready.wait()
        outcome = started[0]
        if isinstance(outcome, BaseException):
            self._thread.join()
            self._thread = None
            raise RelayError(f"the relay could not listen on {self.listen}: {outcome}")
        self._address = outcome
        return outcome

    def stop(self) -> None:
        """Close the listening socket and every connection, join the thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):  # the loop already ended
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        thread.join(timeout=10)
        self._thread = None
        self._address = None

    def stats(self) -> RelayStats:
        return self.stats_now

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- on the loop's thread

    def _run(self, started: list[BaseException | tuple[str, int]], ready: threading.Event) -> None:
        _precise_timers()
        loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_server(self._accepted, *self.listen, backlog=256)
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            started.append((host, port))
        except BaseException as exc:
            started.append(exc)
            loop.close()
            return
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _accepted(self) -> asyncio.Protocol:
        loop = self._loop
        assert loop is not None
        pair = _Pair(self, loop)
        pair.on_close = self._pairs.discard
        self._pairs.add(pair)
        self.stats_now.connections += 1
        loop.create_task(self._connect(pair))
        return pair.client

    async def _connect(self, pair: _Pair) -> None:
        """Connect the target side; the client's bytes wait in their line meanwhile."""
        loop = self._loop
        assert loop is not None
        try:
            transport, _ = await loop.create_connection(lambda: pair.server, *self.target)
        except OSError:
            self.stats_now.failed_connects += 1
            pair.close()
            return
        if pair.closed:  # the client left while we connected
            transport.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            for side in (pair.client, pair.server):
                if side.transport is not None:
                    side.transport.abort()
            pair.close()
        self._pairs.clear()
        me = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not me]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)


def _precise_timers() -> None:
    """Ask for 1 µs timer slack on this thread (Linux's default of 50 µs would show as delay)
    and for a higher priority (only root may lower its niceness: elsewhere it stays)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, _TIMER_SLACK_NS, 0, 0, 0)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gaia.apps.relay", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--target", type=_address, required=True, help="host:port to relay to")
    ap.add_argument("--rtt-us", type=float, required=True, help="added round-trip time, µs")
    ap.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="host:port")
    args = ap.parse_args(argv)
    relay = DelayRelay.for_rtt(args.target, args.rtt_us, listen=args.listen)
    host, port = relay.start()
    print(f"relaying {host}:{port} -> {args.target[0]}:{args.target[1]} (+{args.rtt_us:g} µs RTT)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        relay.stop()
        print(relay.stats().as_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
