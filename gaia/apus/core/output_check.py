"""The output checker's verdict: do the replicas' output hashes for one connection agree?

APUS compares per-connection output hashes across replicas so that a replica whose execution
diverged (a data race, a non-deterministic call) is found and restored by the guard. This is
the pure decision; the leader collects the hashes through acks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from gaia.apus.core.types import OutputVerdict


def decide(
    leader: int, responses: Mapping[int, int], members: Iterable[int]
) -> tuple[OutputVerdict, tuple[int, ...]]:
    """Judge one OUTPUT entry from the hashes the members returned (missing ones count as
    unknown, not as disagreement). Returns the verdict and the replicas to restore."""
    members = tuple(members)
    majority = len(members) // 2 + 1
    answered = {m: responses[m] for m in members if m in responses}
    counts = Counter(answered.values())
    top, votes = counts.most_common(1)[0] if counts else (None, 0)
    if votes < majority:
        return OutputVerdict.NO_MAJORITY, ()
    divergent = tuple(sorted(m for m, h in answered.items() if h != top))
    if top != answered.get(leader):
        return OutputVerdict.LEADER_DIFFERS, divergent
    if divergent:
        return OutputVerdict.MINORITY_DIFFERS, divergent
    return OutputVerdict.AGREE, ()
