"""Farm plumbing overhead against bare Celery, on the same broker, in one run.

1. Bare Celery: N no-op tasks (each increments a Redis counter, the least a task can do
   and still be counted) sent at once to one worker process with the farm's Celery
   settings (threads pool, acks_late, prefetch 1). That worker runs this module as its
   Celery app (``celery -A bench.overhead``), which builds the app on first use.
2. The farm: one job of N images with ``batch_size`` 1 (so N tasks) for the built-in
   ``synthetic`` model, whose engine returns a solid 64x64 image at once. Every task goes
   the whole way: scheduler metering, claim, render, PNG encode, storage write, ledger
   update, task accounting. One worker process (``farm worker --devices cpu:1``) and the
   ``farm scheduler`` process, both real.
3. A 1,000,000-image job posted to the real HTTP API (``farm api``) with no scheduler
   running: submit latency (target < 100 ms) and the Redis memory it adds before any
   dispatch (target < 1 MB).

Usage: python bench/overhead.py [--tasks 1000]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from farm.redis_server import RedisProcess, free_port  # noqa: E402

NOOP_TASK = "bench.noop"


@functools.cache
def noop_app():  # type: ignore[no-untyped-def]
    """The bare baseline: the farm's Celery app settings and one no-op task."""
    from farm.celery_app import make_app
    from farm.config import load

    config = load()
    app = make_app(config)
    r = redis.Redis.from_url(config.redis())
    counter = os.environ.get("BENCH_COUNTER", "bench:noop:done")

    @app.task(name=NOOP_TASK)
    def noop(i: int) -> None:
        r.incr(counter)

    return app


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``celery -A bench.overhead`` looks for ``app`` here; building it on first use keeps
    running the benchmark from needing a broker at import."""
    if name == "app":
        return noop_app()
    raise AttributeError(name)


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def post(url: str, body: dict) -> tuple[int, dict, float]:  # type: ignore[type-arg]
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = json.loads(resp.read())
        return resp.status, data, time.perf_counter() - t0


def bare_celery(n: int, env: dict[str, str], r: redis.Redis, tmp: Path) -> float:
    app = noop_app()
    counter = env["BENCH_COUNTER"]
    worker = spawn(
        [sys.executable, "-m", "celery", "-A", "bench.overhead", "worker", "--pool", "threads",
         "-c", "1", "--prefetch-multiplier", "1", "-Q", NOOP_TASK, "--without-gossip",
         "--without-mingle", "-E", "--loglevel", "WARNING"],
        env, tmp / "bare-worker.log",
    )  # fmt: skip
    try:
        app.send_task(NOOP_TASK, args=[-1], queue=NOOP_TASK)
        wait_until(lambda: int(r.get(counter) or 0) >= 1, 120, "bare worker did not start")
        r.set(counter, 0)
        t0 = time.perf_counter()
        for i in range(n):
            app.send_task(NOOP_TASK, args=[i], queue=NOOP_TASK)
        wait_until(lambda: int(r.get(counter) or 0) >= n, 600, "bare tasks did not finish")
        return time.perf_counter() - t0
    finally:
        stop(worker)


def farm_run(n: int, env: dict[str, str], r: redis.Redis, tmp: Path) -> float:
    from farm.config import Config
    from farm.jobs import Ledger
    from farm.spec import JobSpec

    ledger = Ledger(r, Config.from_env(env).namespace)
    worker = spawn([sys.executable, "-m", "farm.cli", "worker", "--devices", "cpu:1",
                    "--loglevel", "WARNING"], env, tmp / "farm-worker.log")  # fmt: skip
    sched = spawn([sys.executable, "-m", "farm.cli", "scheduler"], env, tmp / "scheduler.log")

    def run_job(count: int) -> float:
        spec = JobSpec(model="synthetic", prompt="load test", count=count, seed=1,
                       width=64, height=64, steps=1, batch_size=1)  # fmt: skip
        t0 = time.perf_counter()
        job = ledger.create(spec)
        wait_until(lambda: ledger.get(job.id).state in ("done", "failed"), 900, "farm job")
        got = ledger.get(job.id)
        if (got.state, got.done) != ("done", count):
            raise RuntimeError(f"farm job ended {got.summary()}")
        return time.perf_counter() - t0

    try:
        run_job(4)  # warm-up: worker up, engine loaded
        return run_job(n)
    finally:
        stop(sched)
        stop(worker)


def million_job(env: dict[str, str], r: redis.Redis, tmp: Path) -> tuple[float, float, int]:
    port = free_port()
    api = spawn([sys.executable, "-m", "farm.cli", "api"], {**env, "FARM_API_PORT": str(port)},
                tmp / "api.log")  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "API did not start")
        spec = {"model": "synthetic", "prompt": ["a", "b", "c", "d"], "count": 250_000,
                "width": 512, "height": 512, "batch_size": 8}  # fmt: skip
        post(base + "/v1/jobs", {**spec, "count": 1})  # warm-up
        before = int(r.info("memory")["used_memory"])
        status, job, first = post(base + "/v1/jobs", spec)
        after = int(r.info("memory")["used_memory"])
        assert status == 201 and job["total"] == 1_000_000, job
        latencies = [first] + [post(base + "/v1/jobs", spec)[2] for _ in range(9)]
        return statistics.median(latencies), max(latencies), after - before
    finally:
        stop(api)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    args = ap.parse_args()
    n = args.tasks
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as d:
        tmp = Path(d)
        with RedisProcess(tmp / "redis", persist=False) as server:
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "FARM_REDIS_URL": server.url,
                "FARM_NAMESPACE": "bench",
                "FARM_STORAGE_URL": f"file://{tmp / 'storage'}",
                "FARM_MODEL_CACHE": str(tmp / "models"),
                "FARM_DATA_DIR": str(tmp),
                "BENCH_COUNTER": "bench:noop:done",
            }
            os.environ.update({k: v for k, v in env.items() if k.startswith("FARM_")})
            r = redis.Redis.from_url(server.url)
            bare_s = bare_celery(n, env, r, tmp)
            farm_s = farm_run(n, env, r, tmp)
            median_s, max_s, mem = million_job(env, r, tmp)
    bare_tps, farm_tps = n / bare_s, n / farm_s
    rows = [
        ("bare Celery no-op", f"{n} tasks", f"{bare_s:.2f} s", f"{bare_tps:.1f} tasks/s"),
        ("farm, synthetic engine", f"{n} tasks", f"{farm_s:.2f} s", f"{farm_tps:.1f} tasks/s"),
    ]
    print(f"{'path':<24} {'work':<12} {'time':>10} {'throughput':>16}")
    for row in rows:
        print(f"{row[0]:<24} {row[1]:<12} {row[2]:>10} {row[3]:>16}")
    print(f"farm / bare throughput ratio: {farm_tps / bare_tps:.3f}")
    print(
        f"1,000,000-image job submit latency: median {median_s * 1000:.1f} ms, "
        f"max {max_s * 1000:.1f} ms (target < 100 ms)"
    )
    print(
        f"Redis memory added by the job before dispatch: {mem / 1024:.1f} KiB (target < 1024 KiB)"
    )
    print(
        json.dumps(
            {
                "tasks": n,
                "bare_celery_tasks_per_s": round(bare_tps, 2),
                "farm_tasks_per_s": round(farm_tps, 2),
                "farm_over_bare_ratio": round(farm_tps / bare_tps, 4),
                "million_job_submit_ms_median": round(median_s * 1000, 2),
                "million_job_submit_ms_max": round(max_s * 1000, 2),
                "million_job_redis_bytes": mem,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
