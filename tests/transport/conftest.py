"""Fixtures for transport tests: throw-away clusters and reaped peer processes."""

from __future__ import annotations

import multiprocessing
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from gaia.transport import ClusterSpec, cleanup_shm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def make_cluster() -> Iterator[Callable[[int], ClusterSpec]]:
    """Build an n-replica cluster on loopback with a fresh id and key; on teardown, fail the
    test if any of its shared-memory files were left behind (every replica must clean up)."""
    made: list[str] = []

    def make(n: int) -> ClusterSpec:
        cluster_id = f"test-{uuid.uuid4().hex[:12]}"
        made.append(cluster_id)
        members = {i: ("127.0.0.1", free_port()) for i in range(n)}
        return ClusterSpec(cluster_id, members, key=os.urandom(32))

    yield make
    leftovers = [path for cluster_id in made for path in cleanup_shm(cluster_id)]
    assert not leftovers, f"left behind in /dev/shm: {leftovers}"


@pytest.fixture
def spawn() -> Iterator[Callable[..., BaseProcess]]:
    """Start a function in a fresh interpreter (spawn: nothing inherited but the arguments);
    every process is killed and reaped on teardown, even if the test failed."""
    context = multiprocessing.get_context("spawn")
    started: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
