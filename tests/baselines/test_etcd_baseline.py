"""The etcd baseline against real members: start, commit, read back through another member,
tear down quickly, and leave no process behind."""

from __future__ import annotations

import shutil
import time
from contextlib import closing
from pathlib import Path

import pytest

from gaia.baselines.etcd import Etcd
from gaia.cluster.procs import live_group_members
from gaia.systems import SystemUnavailable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        shutil.which("etcd") is None, reason="etcd is not installed (`invoke setup`)"
    ),
]


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_three_members_commit_writes_that_another_member_reads(tmp_path: Path, fsync: bool) -> None:
    try:
        cluster = Etcd(3, tmp_path / "logs", fsync=fsync)
    except SystemUnavailable as unavailable:  # an etcd without --unsafe-no-fsync
        pytest.skip(str(unavailable))
    with cluster:
        payloads = [f"{i:064d}".encode() for i in range(20)]
        with closing(cluster.client(first=0)) as writer:
            for payload in payloads:
                writer.submit(payload)
            with closing(cluster.client(first=2)) as reader:
                assert reader.read(writer.key) == (payloads[-1], len(payloads))
        described = cluster.describe()
        assert described["system"] == ("etcd" if fsync else "etcd-nosync")
        assert described["replicas"] == 3
        assert described["unsafe_no_fsync"] is (not fsync)
        assert described["version"].startswith("3.")
        assert ("--unsafe-no-fsync" in (cluster.log_dir / "e1.command").read_text()) is not fsync

        began = time.monotonic()
        cluster.stop()
        # Followers first, then the leader: no 7 s leadership hand-over to a dying member.
        assert time.monotonic() - began < 3.0
    for member in cluster.servers:
        assert member.popen.returncode is not None, f"{member.name} was not reaped"
        assert live_group_members(member.pid) == [], f"{member.name} left processes behind"
        assert (cluster.log_dir / f"{member.name}.exit").is_file()
