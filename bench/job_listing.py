"""Listing jobs by an ended state (``GET /v1/jobs?state=failed``) against the number of jobs.

A dashboard asks for the failed jobs, or pages back through the done ones. Before the
ledger kept an index per ended state, such a listing read every job's record, newest
first, until it had found ``offset + limit`` in that state: a page of the few failed jobs
read the whole history. Now it reads one page of the state's index. This bench ends N
jobs through the ledger's own scripts (one in 500 failed, one in 100 cancelled, the rest
done) and times, side by side, each listing both ways (median of 5):

* ``scan``: the listing as it was, ``Ledger.scan`` over the whole job set (as the ledger
  still lists the unfinished states over the active jobs);
* ``index``: ``Ledger.list`` as it is.

Both must return the same jobs; the bench checks it.

Usage: python bench/job_listing.py [--jobs 2000 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm.jobs import JobRecord, Ledger  # noqa: E402
from farm.redis_server import RedisProcess  # noqa: E402
from farm.spec import JobSpec  # noqa: E402

LIMIT = 50


def timed(fn: Callable[[], list[JobRecord]], n: int = 5) -> tuple[float, list[str]]:
    times, ids = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        ids = [j.id for j in fn()]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), ids


def end_jobs(ledger: Ledger, first: int, n: int) -> None:
    spec = JobSpec(model="m", prompt=[f"prompt {k}" for k in range(10)], count=1, batch_size=10)
    for i in range(first, n):
        job = ledger.create(spec)
        if i % 100 == 0:
            ledger.cancel(job.id)
        else:
            ledger.mark(job.id, list(range(10)), ok=i % 500 != 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, nargs="+", default=[2000, 20000])
    args = ap.parse_args()
    out: dict[str, object] = {"limit": LIMIT}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        server = RedisProcess(d, persist=False).start()
        try:
            ledger = Ledger(redis.Redis.from_url(server.url), "bench")
            print(f"{'jobs':>7}  {'listing':<28}{'scan':>10}{'index':>10}{'scan/index':>12}")
            made = 0
            for n in sorted(args.jobs):
                end_jobs(ledger, made, n)
                made = n
                for state, offset in (("failed", 0), ("cancelled", 0), ("done", 0),
                                      ("done", n // 2)):  # fmt: skip
                    # the listing before the index: every job's record until enough are found
                    before, want = timed(
                        lambda s=state, o=offset: ledger.scan(ledger.key("jobs"), s, LIMIT, o)
                    )
                    now, got = timed(lambda s=state, o=offset: ledger.list(LIMIT, o, s))
                    if got != want or not got:
                        raise SystemExit(f"{state} at {offset}: the two listings differ")
                    what = f"{state}, offset {offset:,}"
                    print(f"{n:>7,}  {what:<28}{before * 1e3:>7.1f} ms{now * 1e3:>7.1f} ms"
                          f"{before / now:>12.1f}")  # fmt: skip
                    rows.append({"jobs": n, "state": state, "offset": offset,
                                 "scan_ms": round(before * 1e3, 2),
                                 "index_ms": round(now * 1e3, 2)})  # fmt: skip
        finally:
            server.stop()
    out["rows"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
