"""Process groups with trivial programs: logs, readiness errors, nothing outlives stop()."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from gaia.cluster.procs import (
    ManagedProcess,
    ProcessGroup,
    ProcessGroupError,
    ProcessSpec,
    free_ports,
    live_group_members,
)


def bash(name: str, script: str) -> ProcessSpec:
    return ProcessSpec(name=name, argv=("bash", "-c", script))


def test_logs_command_and_exit_status_land_in_the_log_dir(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        spec = ProcessSpec(
            name="greeter",
            argv=("bash", "-c", 'echo "hello $WHO"; echo oops >&2; sleep 60'),
            env={"WHO": "it's me"},
            cwd=tmp_path,
        )
        process = group.launch(spec)
        group.wait_ready(
            lambda: [] if "hello" in process.stdout_path.read_text() else [process],
            timeout=5,
            what="greeter",
        )
    assert (tmp_path / "greeter.stdout").read_text() == "hello it's me\n"
    assert (tmp_path / "greeter.stderr").read_text() == "oops\n"
    assert (tmp_path / "greeter.exit").read_text() == f"{-signal.SIGTERM}\n"
    command = (tmp_path / "greeter.command").read_text()
    assert command.startswith(f"cd {tmp_path} && WHO=") and "'it'\"'\"'s me'" in command


def test_stop_reaps_the_whole_group_including_forked_children(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    parent = group.launch(bash("forker", "sleep 60 & wait"))
    deadline = time.monotonic() + 5
    while len(live_group_members(parent.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(live_group_members(parent.pid)) == 2  # bash and its sleep
    group.stop()
    assert live_group_members(parent.pid) == []
    assert parent.popen.returncode is not None
    group.stop()  # idempotent, and never signals a reaped pid again


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path, term_grace=0.5)
    stubborn = group.launch(bash("stubborn", 'trap "" TERM; sleep 60 & wait'))
    time.sleep(0.2)  # let bash install the trap
    began = time.monotonic()
    group.stop()
    assert time.monotonic() - began < 3
    assert stubborn.popen.returncode == -signal.SIGKILL
    assert live_group_members(stubborn.pid) == []


def test_stopping_one_process_leaves_the_others_running(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        first, second = (group.launch(bash(name, "sleep 60")) for name in ("a", "b"))
        group.stop([first], first_signal=signal.SIGKILL)
        assert first.popen.returncode == -signal.SIGKILL
        assert second.running()
    assert not second.running()


def test_an_exit_during_start_up_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        group.launch(bash("crasher", "echo 'bind: address already in use' >&2; exit 3"))
        began = time.monotonic()
        with pytest.raises(ProcessGroupError) as raised:
            group.wait_ready(lambda: group.processes, timeout=30, what="crash test")
    assert time.monotonic() - began < 5
    assert "crasher exited with status 3" in str(raised.value)
    assert "bind: address already in use" in str(raised.value)


def test_a_timeout_names_the_laggards_and_quotes_their_logs(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        ready = group.launch(bash("ready", "sleep 60"))
        slow = group.launch(bash("slow", "echo 'still electing'; sleep 60"))
        time.sleep(0.2)

        def pending() -> list[ManagedProcess]:
            return [slow]

        with pytest.raises(ProcessGroupError, match=r"(?s)waiting for slow\).*still electing"):
            group.wait_ready(pending, timeout=0.3, what="timeout test")
    assert ready.popen.returncode is not None


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(27)
    assert len(set(ports)) == 27
    assert all(port < low for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert not set(ports) & set(free_ports(27)), "ports handed out twice in a row"
