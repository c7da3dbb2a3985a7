"""The shim is built from source on demand, and refuses to let a server run unreplicated when
the segment it was pointed at is missing or of another layout."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gaia.apus.config import ClusterConfig, ConfigError
from gaia.apus.interpose.build import shim_library
from gaia.apus.interpose.segment import AppSegment, L


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
    assert L["GAIA_SEGMENT_SIZE"] == L["GAIA_HDR_SIZE"] + slots + conns
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
