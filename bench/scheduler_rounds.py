"""Scheduler round time against the number of queued jobs, on a real Redis server.

Each round the leader reads every active job (one round trip), places models on workers
and meters tasks into the model queues (``scheduler.service.Scheduler.tick``). This bench
queues N jobs (10 prompts x 10 images, 12 models, mixed priorities) with no worker running,
then times rounds, median of 7 of each taken in turns:

* a round that reads every job's spec and looks for tasks released and never claimed, as
  every round did before the scheduler kept the specs it had read and looked only every
  quarter of ``resend_after`` (and as a new leader's first round still does);
* a steady round.

What a round may cost: the broker holds ``queue_depth`` tasks per worker of a model, one of
them running, so a worker runs dry only if a round takes longer than the other
``queue_depth - 1`` tasks (at 4 images of 2 s, 24 s with the default depth of 4). The last
column is a round's share of that; under 1, workers never wait for the scheduler.

One more row: a single job whose sweep has 100,000 cells. A round reads and lists only the
cells around where its release has got to, so this costs what a job of one cell does.

Usage: python bench/scheduler_rounds.py [--jobs 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm.config import Config  # noqa: E402
from farm.jobs import Ledger  # noqa: E402
from farm.redis_server import RedisProcess  # noqa: E402
from farm.spec import JobSpec  # noqa: E402
from scheduler.service import Scheduler  # noqa: E402

TASK_S = 4 * 2.0  # a task of 4 images at 2 s each


def rounds(url: str, namespace: str, n: int = 7) -> tuple[float, float]:
    """Median seconds of a round that reads every spec and looks for unclaimed tasks, and
    of a steady round, taken in turns after a first round that takes the lead."""
    r = redis.Redis.from_url(url)
    sched = Scheduler(Config(redis_url=url, namespace=namespace), r)
    sched.tick()
    full, steady = [], []
    for _ in range(n):
        sched.ledger._specs = {}  # as if never read
        sched.last_stale_scan = -math.inf  # due for a look (nothing is old enough)
        t0 = time.perf_counter()
        sched.tick()
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sched.tick()
        steady.append(time.perf_counter() - t0)
    sched.lease.release()
    r.close()
    return statistics.median(full), statistics.median(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[100, 1000, 10000])
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # no worker: the first round's resends would log

    depth = Config().queue_depth
    budget = (depth - 1) * TASK_S
    out: dict[str, object] = {"queue_depth": depth, "budget_s": budget}
    with tempfile.TemporaryDirectory() as d:
        server = RedisProcess(d, persist=False).start()
        try:
            r = redis.Redis.from_url(server.url)
            print(f"a worker runs dry if a round takes over {budget:.0f} s")
            print(f"{'active jobs':>12}{'full read':>12}{'steady round':>14}"
                  f"{'per job':>10}{'full/steady':>13}{'round/budget':>14}")  # fmt: skip
            rows = []
            made = 0
            ledger = Ledger(r, "bench")
            for n in sorted(args.jobs):
                for i in range(made, n):
                    ledger.create(
                        JobSpec(
                            model=f"m{i % 12:02d}",
                            prompt=[f"prompt {i} {k}" for k in range(10)],
                            count=10,
                            priority=40 + 10 * (i % 3),
                            seed=i,
                        )
                    )
                made = n
                full, steady = rounds(server.url, "bench")
                rows.append({"jobs": n, "full_s": round(full, 4), "steady_s": round(steady, 4)})
                print(f"{n:>12}{full * 1e3:>9.0f} ms{steady * 1e3:>11.0f} ms"
                      f"{steady / n * 1e6:>7.0f} us{full / steady:>13.2f}"
                      f"{steady / budget:>14.4f}")  # fmt: skip
            out["rows"] = rows
            wide = Ledger(r, "wide")
            cfgs = [round(1 + k * 0.01, 2) for k in range(1000)]
            sweep = {"cfg_scale": cfgs, "steps": list(range(1, 101))}
            wide.create(JobSpec(model="m01", prompt="a", sweep=sweep))
            full, steady = rounds(server.url, "wide")
            out["sweep_100k_cells"] = {"full_s": round(full, 4), "steady_s": round(steady, 4)}
            print(f"{'1 job, 100,000 sweep cells':>26}: full read {full * 1e3:.0f} ms, "
                  f"steady {steady * 1e3:.0f} ms, {steady / budget:.4f} of the budget")  # fmt: skip
            r.close()
        finally:
            server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
