"""Pure placement policy: which model each worker serves.

A load of model m on worker w costs ``c(w, m)`` seconds: 0 if w holds m now, else the
measured ``load_s`` (default ``default_load_s``) times ``ram_factor`` or ``disk_factor`` when
m sits in w's host RAM or local disk. With ``B`` the backlog of m (render seconds left) and
``k`` its holders, one more holder that first pays ``c`` finishes m at ``(B + c) / (k + 1)``
instead of ``B / k``: it helps exactly when ``B > k * c``. The rule, in order:

1. Keep: a worker stays on its model while that model has backlog. A worker whose model
   has none is free (it keeps the weights it holds; ``None`` only if it holds nothing).
2. Cover: each model with backlog and no holder gets one, highest priority then oldest
   first: the free worker with the lowest ``c``; else a worker taken from the model that
   finishes earliest without it (least ``B / (k - 1)``), which must keep at least one
   holder, have no higher priority, and have held it for ``min_dwell_s``.
3. Grow: free workers go, one at a time, to the model (higher priority first, then the
   longest projected finish ``B / k``) with ``B > hysteresis * k * c``, cheapest worker
   first. ``hysteresis`` >> 1 is the switching bound: a holder joins only when every
   current holder has many loads' worth of work left, since a worker that barely helps is
   soon free again and pays another load elsewhere (16 is tuned by ``bench/affinity.py``).
4. Preempt: a model whose priority exceeds another's by ``priority_preempt`` takes that
   model's workers (lowest priority, then most held, first; its last holder too) while
   it passes the test of 3.

Models in a worker's ``blocked`` set are never given to it. Same inputs, same answer: the
input order does not matter, ties break on names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerState:
    name: str
    model: str | None  # model assigned (and loaded or loading) now, or None
    ram: frozenset[str] = frozenset()  # models held in host RAM (cheap reload)
    disk: frozenset[str] = frozenset()  # models in the node's local disk cache
    assigned_at: float = 0.0  # when `model` was assigned (for dwell)
    blocked: frozenset[str] = frozenset()  # models this worker must not take
    load_s: Mapping[str, float] = field(
        default_factory=dict, hash=False
    )  # measured load seconds per model


@dataclass(frozen=True)
class ModelDemand:
    model: str
    backlog_s: float  # render seconds left: unfinished images x seconds per image
    priority: int  # highest effective priority among its unfinished jobs (0-100)
    oldest: float  # submit time of its oldest unfinished job


@dataclass(frozen=True)
class PlacementParams:
    default_load_s: float = 30.0  # load seconds from object storage when unmeasured
    ram_factor: float = 0.1  # a load from host RAM costs this fraction
    disk_factor: float = 0.5  # a load from local disk costs this fraction
    hysteresis: float = 16.0  # grow only when backlog > hysteresis * holders * load
    min_dwell_s: float = 0.0  # a busy worker keeps its model at least this long
    priority_preempt: int = 20  # priority gap that lets a model take another's workers


def load_cost(worker: WorkerState, model: str, params: PlacementParams) -> float:
    """Seconds ``worker`` needs before it can render ``model``."""
    if worker.model == model:
        return 0.0
    base = worker.load_s.get(model, params.default_load_s)
    if model in worker.ram:
        return base * params.ram_factor
    if model in worker.disk:
        return base * params.disk_factor
    return base


def _merge(demands: Sequence[ModelDemand]) -> dict[str, ModelDemand]:
    """Models with backlog, one entry each (duplicates summed)."""
    out: dict[str, ModelDemand] = {}
    for d in sorted(demands, key=lambda d: (d.model, -d.priority, d.oldest, d.backlog_s)):
        if d.backlog_s <= 0:
            continue
        if (o := out.get(d.model)) is not None:
            d = ModelDemand(
                d.model,
                o.backlog_s + d.backlog_s,
                max(o.priority, d.priority),
                min(o.oldest, d.oldest),
            )
        out[d.model] = d
    return out


def place(
    workers: Sequence[WorkerState],
    demands: Sequence[ModelDemand],
    now: float,
    params: PlacementParams,
) -> dict[str, str | None]:
    """Worker name -> model it should serve now (``None``: nothing)."""
    live = _merge(demands)
    ws = sorted(workers, key=lambda w: w.name)
    plan: dict[str, str | None] = {}
    holders: dict[str, list[WorkerState]] = {m: [] for m in live}
    free: list[WorkerState] = []
    for w in ws:  # 1. keep
        keeps = w.model is not None and w.model not in w.blocked
        plan[w.name] = w.model if keeps else None
        if keeps and w.model in live:
            holders[w.model].append(w)
        else:
            free.append(w)

    def cost(w: WorkerState, m: str) -> float:
        return load_cost(w, m, params)

    def movable(w: WorkerState, m: str) -> bool:
        return m not in w.blocked and now - w.assigned_at >= params.min_dwell_s

    def give(w: WorkerState, m: str) -> None:
        if w in free:
            free.remove(w)
        else:
            holders[str(plan[w.name])].remove(w)
        plan[w.name] = m
        holders[m].append(w)

    def cheapest(cands: list[WorkerState], m: str) -> WorkerState | None:
        ok = [w for w in cands if m not in w.blocked]
        return min(ok, key=lambda w: (cost(w, m), w.name), default=None)

    def wants(d: ModelDemand, c: float) -> bool:
        return d.backlog_s > params.hysteresis * len(holders[d.model]) * c

    order = sorted(live.values(), key=lambda d: (-d.priority, d.oldest, d.model))

    for d in order:  # 2. cover
        if holders[d.model]:
            continue
        w = cheapest(free, d.model)
        if w is None:
            donors = [
                v
                for v in order
                if len(holders[v.model]) >= 2 and v.priority <= d.priority and v is not d
            ]
            donors.sort(key=lambda v: (v.backlog_s / (len(holders[v.model]) - 1), v.model))
            for v in donors:
                w = cheapest([h for h in holders[v.model] if movable(h, d.model)], d.model)
                if w is not None:
                    break
        if w is not None:
            give(w, d.model)

    while free:  # 3. grow
        best: tuple[tuple[float, float, str], WorkerState, str] | None = None
        for d in order:
            w = cheapest(free, d.model)
            if w is None or not wants(d, cost(w, d.model)):
                continue
            k = len(holders[d.model])
            key = (-d.priority, -d.backlog_s / k if k else float("-inf"), d.model)
            if best is None or key < best[0]:
                best = (key, w, d.model)
        if best is None:
            break
        give(best[1], best[2])

    for d in order:  # 4. preempt
        while True:
            donors = [
                v
                for v in order
                if v.priority + params.priority_preempt <= d.priority and holders[v.model]
            ]
            donors.sort(key=lambda v: (v.priority, -len(holders[v.model]), v.model))
            pick = None
            for v in donors:
                cands = [h for h in holders[v.model] if movable(h, d.model)]
                w = cheapest(cands, d.model)
                if w is not None:
                    pick = w
                    break
            if pick is None or not wants(d, cost(pick, d.model)):
                break
            give(pick, d.model)
    return plan
