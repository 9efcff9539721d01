"""Pure release policy: which job's tasks go to the broker next.

No I/O here: the service loop feeds in what it read from Redis and carries out the
decisions, and tests (and later the simulator) call the same functions directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True)
class JobView:
    id: str
    priority: int  # 0-100, higher first
    created_at: float
    outstanding: int  # tasks released and not finished
    remaining: int  # tasks not released yet
    level: int = 0  # broker priority class, higher first (the broker orders by it)


def capacity(workers: int, depth_per_worker: int) -> int:
    """How many tasks may be released and unfinished at once: a shallow broker queue."""
    return max(2, max(1, workers) * max(1, depth_per_worker))


def plan_releases(jobs: list[JobView], cap: int) -> list[tuple[str, int]]:
    """Share the free slots (``cap`` minus what is outstanding) among runnable jobs.

    Higher priority first. Among jobs of equal priority the slots go round-robin, one at
    a time, to the job with the fewest tasks outstanding (older first on ties), so equal
    jobs share the farm fairly instead of the oldest taking it all.

    Tasks of a lower broker priority class (``level``) do not take slots from a higher
    one: the broker hands out the higher class first anyway, so a high-priority job gets
    its tasks into the queue at once and a worker starts one as soon as it is free.
    """
    grants: dict[str, int] = {}
    ordered = sorted(jobs, key=lambda j: (-j.level, -j.priority, j.created_at, j.id))
    for level, level_iter in groupby(ordered, key=lambda j: j.level):
        above = sum(j.outstanding for j in jobs if j.level >= level)
        free = cap - above - sum(grants.values())
        for _, group_iter in groupby(list(level_iter), key=lambda j: j.priority):
            if free <= 0:
                break
            group = [j for j in group_iter if j.remaining > 0]
            load = {j.id: j.outstanding for j in group}
            left = {j.id: j.remaining for j in group}
            while free > 0 and any(left.values()):
                pick = min(
                    (j for j in group if left[j.id] > 0),
                    key=lambda j: (load[j.id], j.created_at, j.id),
                )
                grants[pick.id] = grants.get(pick.id, 0) + 1
                load[pick.id] += 1
                left[pick.id] -= 1
                free -= 1
    return [(j.id, grants[j.id]) for j in ordered if j.id in grants]
