"""Model affinity: the farm's placement policy against a naive shared queue, in simulation.

Workload (fixed seed): 16 workers, 12 models with Zipf-like popularity (weight of the k-th
model ~ 1/k^1.1; each model gets one job, the other 48 jobs draw their model by weight),
30 s per load, 2 s per image, tasks of 4 images, 20,000 images in 60 jobs of log-normal
sizes arriving as a Poisson process over the first ~40% of the ideal makespan
(20,000 x 2 s / 16 = 2,500 s). Both runs go through ``scheduler.sim`` on the same jobs:
the farm (``scheduler.placement.place``, per-model queues) and the naive queue (one FIFO
queue in arrival order; a free worker takes the next task and loads its model if needed).

Lower bounds, true for ANY schedule, even one that knows the future (N workers, load L
per model, r seconds per image, no model loaded at t=0, one model in VRAM at a time):

* loads, given a makespan T: model m's W_m render seconds can start only after its first
  job arrives (a_m) and after some load of m (>= L from t=0), so one worker renders at most
  T - max(a_m, L) seconds of m and each worker that renders m loads it at least once:
  LB_loads(T) = sum_m max(1, ceil(W_m / (T - max(a_m, L)))). It is evaluated at the farm's
  own makespan: no schedule that finishes as early as the farm does uses fewer loads.
* makespan: (a) after any arrival time t, the work arriving at or after t takes
  W(>= t) / N; each model first seen at a_m >= t also costs some worker min(L, a_m - t)
  of non-rendering time after t (either a load after t, or holding m idle from t until
  a_m, since a worker holds one model): LB >= t + (W(>= t) + sum min(L, a_m - t)) / N,
  with all loads counted at t = 0. (b) a job cannot start before max(arrival, L) and
  its images need ceil(images / N) rounds of r: LB >= max(a_j, L) + ceil(n_j / N) * r.

Targets (issue 3): farm loads <= 1.25 x LB_loads, farm makespan <= 1.15 x LB_makespan, and
at least 3x fewer loads than the naive queue.

Both bounds know the future; the farm does not. To show how much of the gap that is, the
script also runs the same policy clairvoyant (``simulate(..., clairvoyant=True)``: placement
sees every job's work from t=0, though it still cannot render a job before it arrives), and
prints loads and makespan against their bounds for both over a range of ``hysteresis``, the
policy's one knob that trades loads for makespan. Last, it runs the policy told of each job
a fixed time before the job arrives (``notice_s``): how far ahead a farm would have to know
its work to meet both targets.

Usage: python bench/affinity.py [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.placement import PlacementParams  # noqa: E402
from scheduler.sim import SimFarm, SimJob, SimResult, simulate, simulate_naive  # noqa: E402

WORKERS, MODELS, ZIPF_S = 16, 12, 1.1
LOAD_S, RENDER_S, BATCH = 30.0, 2.0, 4
IMAGES, JOBS = 20_000, 60
ARRIVAL_WINDOW_S = 0.4 * IMAGES * RENDER_S / WORKERS
FRONTIER = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0)
NOTICE_S = (0.0, 100.0, 300.0, 600.0, 1000.0)


def workload(seed: int) -> list[SimJob]:
    rng = random.Random(seed)
    models = [f"m{k:02d}" for k in range(1, MODELS + 1)]
    weights = [1 / k**ZIPF_S for k in range(1, MODELS + 1)]
    picks = models + rng.choices(models, weights, k=JOBS - MODELS)
    rng.shuffle(picks)
    raw = [rng.lognormvariate(0.0, 1.0) for _ in range(JOBS)]
    exact = [IMAGES * x / sum(raw) for x in raw]
    sizes = [max(1, math.floor(x)) for x in exact]
    by_rest = sorted(range(JOBS), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_rest[: IMAGES - sum(sizes)]:  # largest remainders get the rest
        sizes[i] += 1
    t, arrivals = 0.0, []
    for _ in range(JOBS):
        arrivals.append(t)
        t += rng.expovariate(JOBS / ARRIVAL_WINDOW_S)
    return [SimJob(f"j{i:02d}", picks[i], sizes[i], 50, round(arrivals[i], 3)) for i in range(JOBS)]


def loads_lower_bound(jobs: list[SimJob], makespan: float) -> int:
    work: dict[str, float] = {}
    first: dict[str, float] = {}
    for j in jobs:
        work[j.model] = work.get(j.model, 0.0) + j.images * RENDER_S
        first[j.model] = min(first.get(j.model, math.inf), j.arrival)
    return sum(max(1, math.ceil(work[m] / (makespan - max(first[m], LOAD_S)) - 1e-9)) for m in work)


def makespan_lower_bound(jobs: list[SimJob]) -> float:
    first: dict[str, float] = {}
    for j in jobs:
        first[j.model] = min(first.get(j.model, math.inf), j.arrival)
    best = 0.0
    for t in sorted({0.0, *(j.arrival for j in jobs)}):
        late = sum(j.images * RENDER_S for j in jobs if j.arrival >= t)
        loads = sum(LOAD_S if t == 0 else min(LOAD_S, a - t) for a in first.values() if a >= t)
        best = max(best, t + (late + loads) / WORKERS)
    for j in jobs:
        best = max(best, max(j.arrival, LOAD_S) + math.ceil(j.images / WORKERS) * RENDER_S)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    jobs = workload(args.seed)
    farm = SimFarm(WORKERS, default_load_s=LOAD_S, render_s=RENDER_S, batch=BATCH)
    t0 = time.perf_counter()
    params = PlacementParams(default_load_s=LOAD_S)
    ours = simulate(farm, jobs, params)
    naive = simulate_naive(farm, jobs)
    wall = time.perf_counter() - t0
    lb_loads = loads_lower_bound(jobs, ours.makespan_s)
    lb_make = makespan_lower_bound(jobs)

    per_model: dict[str, int] = {}
    for j in jobs:
        per_model[j.model] = per_model.get(j.model, 0) + j.images
    print(f"workload (seed {args.seed}): {WORKERS} workers, {len(jobs)} jobs, {IMAGES} images,")
    print(f"  load {LOAD_S:.0f} s, {RENDER_S:.0f} s/image, {BATCH} images/task, arrivals over")
    print(f"  {max(j.arrival for j in jobs):.0f} s; images per model:")
    print("  " + ", ".join(f"{m} {n}" for m, n in sorted(per_model.items())))
    print(f"  farm policy: {params}")
    print()
    print(f"{'':24}{'farm policy':>14}{'naive queue':>14}")

    def row(name: str, f: str, get) -> None:  # type: ignore[no-untyped-def]
        print(f"{name:24}{format(get(ours), f):>14}{format(get(naive), f):>14}")

    row("model loads", "d", lambda r: r.loads)
    row("makespan (s)", ".0f", lambda r: r.makespan_s)
    row("mean job completion (s)", ".0f", lambda r: r.mean_jct_s)
    row("p95 job completion (s)", ".0f", lambda r: r.p95_jct_s)
    row("rendering fraction", ".3f", lambda r: r.render_fraction)
    print()
    print(f"loads lower bound at the farm's makespan: {lb_loads}")
    print(f"makespan lower bound: {lb_make:.0f} s")
    print()

    ratios = {
        "loads_vs_lower_bound": ours.loads / lb_loads,
        "makespan_vs_lower_bound": ours.makespan_s / lb_make,
        "naive_loads_vs_farm": naive.loads / ours.loads,
    }
    checks = [
        ("farm loads / loads lower bound", ratios["loads_vs_lower_bound"], "<=", 1.25),
        ("farm makespan / makespan lower bound", ratios["makespan_vs_lower_bound"], "<=", 1.15),
        ("naive loads / farm loads", ratios["naive_loads_vs_farm"], ">=", 3.0),
    ]
    for name, value, op, target in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"{name:40}{value:8.3f}  target {op} {target:<5} {'PASS' if ok else 'MISS'}")
    print(f"(both simulations took {wall:.2f} s of wall time)")
    print()
    print("hysteresis against both bounds (loads / LB_loads, makespan / LB_makespan):")
    print(f"{'hysteresis':>12}{'farm':>22}{'farm, clairvoyant':>24}")
    frontier = []
    for h in FRONTIER:
        p = PlacementParams(default_load_s=LOAD_S, hysteresis=h)
        cells = []
        for clair in (False, True):
            r = simulate(farm, jobs, p, clairvoyant=clair)
            lr, mr = r.loads / loads_lower_bound(jobs, r.makespan_s), r.makespan_s / lb_make
            met = lr <= 1.25 and mr <= 1.15
            cells.append(f"{lr:.2f}, {mr:.3f} {'both' if met else '    '}")
            frontier.append(
                {
                    "hysteresis": h,
                    "clairvoyant": clair,
                    "loads": round(lr, 3),
                    "makespan": round(mr, 3),
                    "both_met": met,
                }
            )
        print(f"{h:>12g}{cells[0]:>22}{cells[1]:>24}")

    print()
    print("advance notice: placement told of each job this long before it arrives")
    print(f"{'notice (s)':>12}{'loads / LB':>12}{'makespan / LB':>16}")
    notice = []
    for n in NOTICE_S:
        r = simulate(farm, jobs, params, notice_s=n)
        lr, mr = r.loads / loads_lower_bound(jobs, r.makespan_s), r.makespan_s / lb_make
        met = lr <= 1.25 and mr <= 1.15
        print(f"{n:>12g}{lr:>12.2f}{mr:>16.3f} {'both' if met else ''}")
        notice.append(
            {"notice_s": n, "loads": round(lr, 3), "makespan": round(mr, 3), "both_met": met}
        )

    def figures(prefix: str, r: SimResult) -> dict[str, float]:
        return {
            f"{prefix}_loads": r.loads,
            f"{prefix}_makespan_s": round(r.makespan_s, 1),
            f"{prefix}_mean_jct_s": round(r.mean_jct_s, 1),
            f"{prefix}_p95_jct_s": round(r.p95_jct_s, 1),
            f"{prefix}_render_fraction": round(r.render_fraction, 4),
        }

    out = {
        "seed": args.seed,
        **figures("farm", ours),
        **figures("naive", naive),
        "loads_lower_bound": lb_loads,
        "makespan_lower_bound_s": round(lb_make, 1),
        **{k: round(v, 3) for k, v in ratios.items()},
        "all_targets_met": all((v <= t if op == "<=" else v >= t) for _, v, op, t in checks),
        "frontier": frontier,
        "notice": notice,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
