"""The guard: checkpoints of a replica's server, taken with the server's own mechanism, and the
state a restore starts from.

Redis: the replayer asks for a checkpoint every `checkpoint_every` replayed entries; the guard
takes it only at a quiet point, where every replay connection's bytes have been read and parsed
and no connection carries state a fresh connection would lack (CLIENT LIST: empty query buffer,
no MULTI, database 0, no subscriptions), then runs SAVE and keeps the RDB file with the log
index it stands for and the connections open at that index, each with the output written on it
so far and its protocol version (a client may have said HELLO 3: the reopened connection says
it again, so the replies go on in the same encoding). A restarted or diverged replica
starts its server from the newest checkpoint of its cluster, reopens those connections, and
replays the log after the index.

memcached has no snapshot of its own: its checkpoint is log position 0, so a restore starts
it empty and replays the whole log (which this runtime keeps: it does not compact app logs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from gaia.apus.interpose.segment import ConnOutput

log = logging.getLogger("gaia.apus.guard")

KEEP = 2  # checkpoints kept per replica: the newest, and one in case it is being written


def resp(*args: str) -> bytes:
    """One Redis command in the RESP protocol."""
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        raw = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class SavedConn(NamedTuple):
    """A connection open at a checkpoint: the output the server had written on it (a restore
    carries it on, so output checks still compare) and the RESP version it spoke."""

    conn: int
    output: ConnOutput
    protocol: int = 2


@dataclass(frozen=True)
class Checkpoint:
    cluster_id: str
    index: int  # every committed entry up to here is in the snapshot, none after
    conns: tuple[SavedConn, ...]  # connections open at `index`: a restore reopens them
    snapshot: Path | None  # the server's own file (None: the server starts empty)


def _quiet_protocols(client_list: bytes) -> dict[int, int] | None:
    """Each client's RESP version by its source port, if every client but the asking one is
    between commands and holds no other per-connection state; None if one does."""
    want = {"qbuf": "0", "multi": "-1", "db": "0", "flags": "N", "sub": "0", "psub": "0"}
    protocols = {}
    for line in client_list.decode(errors="replace").splitlines():
        if "addr=" not in line or "cmd=client|list" in line:
            continue
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if any(fields.get(k) != v for k, v in want.items()):
            return None
        protocols[int(fields["addr"].rsplit(":", 1)[1])] = int(fields.get("resp", "2"))
    return protocols


class Guard:
    def __init__(
        self, app: str, cluster_id: str, workdir: Path, query: Callable[[bytes], bytes]
    ) -> None:
        self.app = app
        self.cluster_id = cluster_id
        self.workdir = workdir
        self.dir = workdir.with_name(workdir.name + ".checkpoints")
        self._query = query

    @property
    def snapshots(self) -> bool:
        """Whether this app can be checkpointed (else a restore replays from index 0)."""
        return self.app == "redis"

    def latest(self, upto: int | None = None) -> Checkpoint | None:
        """The newest complete checkpoint of this cluster (its metadata is written last), at
        or before log index `upto` if given."""
        found: list[Checkpoint] = []
        for meta in self.dir.glob("ckpt-*.json"):
            try:
                raw = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError) as e:
                log.warning("ignoring checkpoint %s: %s", meta, e)
                continue
            snapshot = self.dir / raw["snapshot"]
            if raw.get("cluster_id") == self.cluster_id and snapshot.exists():
                conns = tuple(
                    SavedConn(int(c), ConnOutput(int(n), int(crc)), int(proto))
                    for c, n, crc, proto in raw["conns"]
                )
                found.append(Checkpoint(self.cluster_id, raw["index"], conns, snapshot))
        usable = [c for c in found if upto is None or c.index <= upto]
        return max(usable, key=lambda c: c.index, default=None)

    def take(
        self, index: int, outputs: Callable[[], tuple[tuple[int, ConnOutput, int], ...]]
    ) -> Checkpoint | None:
        """Checkpoint the server at log `index` if it is quiet now; None if it is not (or the
        app has no snapshots): the replayer tries again after its next entry. `outputs` is
        read once SAVE has answered (by then the server has written every earlier reply): each
        connection's id, output and local port."""
        if not self.snapshots:
            return None
        protocols = _quiet_protocols(self._query(resp("CLIENT", "LIST")))
        if protocols is None:
            return None
        answer = self._query(resp("SAVE"))
        if not answer.startswith(b"+OK"):
            log.warning("checkpoint at %d: SAVE answered %r", index, answer[:200])
            return None
        conns = tuple(SavedConn(c, out, protocols.get(port, 2)) for c, out, port in outputs())
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{index:012d}"
        snapshot = self.dir / f"{name}.rdb"
        os.replace(self.workdir / "dump.rdb", snapshot)
        rows = [[c.conn, c.output.nbytes, c.output.crc, c.protocol] for c in conns]
        meta = {"cluster_id": self.cluster_id, "index": index, "conns": rows}
        tmp = self.dir / f"{name}.json.tmp"
        tmp.write_text(json.dumps(meta | {"snapshot": snapshot.name}) + "\n")
        tmp.rename(self.dir / f"{name}.json")
        self._prune()
        log.info("checkpoint at index %d (%d open connections)", index, len(conns))
        return Checkpoint(self.cluster_id, index, conns, snapshot)

    def discard(self) -> None:
        """Forget every checkpoint (they may all hold a fault): the next start is empty."""
        for path in self.dir.glob("ckpt-*"):
            path.unlink(missing_ok=True)

    def _prune(self) -> None:
        metas = sorted(self.dir.glob("ckpt-*.json"))
        for meta in metas[:-KEEP]:
            meta.unlink(missing_ok=True)
            meta.with_suffix(".rdb").unlink(missing_ok=True)

    def stage(self, checkpoint: Checkpoint | None) -> None:
        """Put the snapshot where the server loads it at start (or none: it starts empty)."""
        target = self.workdir / "dump.rdb"
        target.unlink(missing_ok=True)
        if checkpoint is not None and checkpoint.snapshot is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint.snapshot, target)
