"""The life cycle every local baseline shares, with `sleep` standing in for the servers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gaia.cluster.ensemble import LocalEnsemble
from gaia.cluster.procs import ManagedProcess, ProcessSpec, live_group_members


class Sleepers(LocalEnsemble):
    name = "sleepers"

    def __init__(self, replicas: int, log_dir: Path, *, interrupt: bool = False) -> None:
        super().__init__(replicas, log_dir, data_root=None, start_timeout=5.0)
        self.interrupt = interrupt
        self.data_roots: list[Path] = []

    def _server_specs(self, data_root: Path) -> list[ProcessSpec]:
        self.data_roots.append(data_root)
        return [
            ProcessSpec(name=f"s{i}", argv=("sleep", "60"), cwd=data_root)
            for i in range(self.replicas)
        ]

    def _not_ready(self) -> list[ManagedProcess]:
        if self.interrupt:
            raise KeyboardInterrupt
        return []

    def _details(self) -> Mapping[str, Any]:
        return {"version": "0"}


def assert_all_gone(ensemble: LocalEnsemble) -> None:
    assert all(live_group_members(server.pid) == [] for server in ensemble.servers)
    assert all(server.popen.returncode is not None for server in ensemble.servers)


def test_ctrl_c_during_start_stops_what_was_started(tmp_path: Path) -> None:
    ensemble = Sleepers(3, tmp_path, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        ensemble.start()
    assert len(ensemble.servers) == 3
    assert_all_gone(ensemble)
    assert not ensemble.data_roots[0].exists()


def test_kill_one_then_stop_all(tmp_path: Path) -> None:
    with Sleepers(3, tmp_path) as ensemble:
        described = dict(ensemble.describe())
        assert described.pop("isolation")["mode"] in ("netns", "none")  # tests/cluster/test_netns
        assert described == {"system": "sleepers", "replicas": 3, "version": "0"}
        ensemble.kill(1)
        assert [s.running() for s in ensemble.servers] == [True, False, True]
        with pytest.raises(RuntimeError, match="already started"):
            ensemble.start()
    assert_all_gone(ensemble)
    assert not ensemble.data_roots[0].exists()
    assert (tmp_path / "s1.exit").read_text() == "-9\n"


def test_clients_are_spread_round_robin_unless_pinned(tmp_path: Path) -> None:
    ensemble = Sleepers(3, tmp_path)
    picks = [ensemble._next_client(None) for _ in range(4)] + [ensemble._next_client(2)]
    assert picks == [(0, 0), (1, 1), (2, 2), (3, 0), (4, 2)]
