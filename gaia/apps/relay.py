"""A user-space delaying TCP relay: the client network that netem would emulate, without netem.

    python -m gaia.apps.relay --target 127.0.0.1:6379 --rtt-us 301 [--listen 127.0.0.1:0]

The APUS and TRIPOD evaluations ran their load generators on a machine 301 µs (ping) away from
the servers; this kernel has no netem, so the experiments put this relay between the load tool
and the server (the unreplicated baseline and the replicated leader alike). The relay itself is
a small C program (relay.c, compiled on first use like the shim: gaia.native), one epoll loop
in a process of its own, so that it neither shares an interpreter with the harness nor becomes
the bottleneck at many connections (the Python relay it replaces added ~70 µs per round trip
and saturated at 12-25k requests/s). Every accepted client connection gets its own connection
to the target, and each direction is one delay line: a chunk read from one side is held until
`arrival + one_way_delay` and then written to the other side, in arrival order, so bytes are
never reordered and the delay does not grow with load.

- Half-closes travel like data: an EOF from one side reaches the other side after the same
  delay (after every byte before it), and a connection ends once both directions have.
- Buffers are bounded: a side is not read while its delay line holds more than `max_buffer`
  bytes, so TCP flow control pushes back on a sender that outruns its receiver.
- Timers are a timerfd with 1 µs of slack, set early by the loop's typical (median) lateness,
  so that chunks typically get the delay asked for; where allowed (root) the relay runs at
  nice -10, so that busy replica daemons on a small machine do not delay the replicated
  system's packets more than the baseline's.
- `stop()` ends the process (every relayed connection with it); the relay is also a context
  manager.

`stats()` reads the counters the process keeps in a shared file, live: connections, bytes each
way and the delay chunks actually got (the mean is what the load tool saw added, minus the
relay's own processing before a chunk is stamped).
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from gaia.native import WARNINGS, build, cache_dir

DEFAULT_MAX_BUFFER = 1 << 20
"""Bytes a direction's delay line may hold before the relay stops reading its sender."""

SOURCE = Path(__file__).resolve().parent / "relay.c"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# relay.c's struct shared: connections, failed_connects, then per direction (to the server,
# to the client) chunks, bytes, delay_sum_ns, delay_max_ns, paused
_SHARED = struct.Struct("<12Q")


class RelayError(RuntimeError):
    """The relay could not start (the listening address is taken, the program failed)."""


def relay_binary(cache: Path | None = None) -> Path:
    """The built relay program, compiling it first if this version is not built yet."""
    return build("gaia-relay", (SOURCE,), WARNINGS, cache=cache or cache_dir("relay"))


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
        self._proc: subprocess.Popen[str] | None = None
        self._stats_file: Path | None = None
        self._stats_map: mmap.mmap | None = None
        self._final: RelayStats | None = None
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
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> tuple[str, int]:
        if self._proc is not None:
            raise RelayError("the relay was already started")
        fd, name = tempfile.mkstemp(prefix="gaia-relay-", suffix=".stats", dir="/dev/shm")
        os.ftruncate(fd, _SHARED.size)
        self._stats_map = mmap.mmap(fd, _SHARED.size)
        os.close(fd)
        self._stats_file = Path(name)
        argv = [
            str(relay_binary()),
            *map(str, self.listen),
            *map(str, self.target),
            str(round(self.one_way_delay_s * 1e9)),
            str(self.max_buffer),
            name,
        ]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 2:
            self._proc.wait(timeout=START_TIMEOUT_S)
            err = self._proc.stderr.read().strip() if self._proc.stderr else ""
            self._release()
            self._proc = None
            raise RelayError(f"the relay could not listen on {self.listen}: {err}")
        self._address = (line[0], int(line[1]))
        return self._address

    def stop(self) -> None:
        """End the relay and every connection through it; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._final = self.stats()
        self._release()
        self._proc = None
        self._address = None

    def stats(self) -> RelayStats:
        """The relay's counters now (after `stop`, as they were at the end)."""
        if self._stats_map is None:
            return self._final or RelayStats(self.one_way_delay_s * 1e6)
        v = _SHARED.unpack_from(self._stats_map)

        def direction(
            chunks: int, nbytes: int, delay_ns: int, max_ns: int, paused: int
        ) -> DirectionStats:
            return DirectionStats(chunks, nbytes, delay_ns / 1e9, max_ns / 1e9, paused)

        return RelayStats(
            self.one_way_delay_s * 1e6, v[0], v[1], direction(*v[2:7]), direction(*v[7:12])
        )

    def _release(self) -> None:
        if self._stats_map is not None:
            self._stats_map.close()
            self._stats_map = None
        if self._stats_file is not None:
            self._stats_file.unlink(missing_ok=True)
            self._stats_file = None

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
