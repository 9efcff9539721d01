"""Bare Celery baseline for bench/overhead.py: the farm's Celery settings, a no-op task.

The task only increments a Redis counter so the benchmark can see it finish; it is the
least a task can do and still be counted.
"""

import os

import redis

from farm.celery_app import make_app
from farm.config import load

config = load()
app = make_app(config)
_r = redis.Redis.from_url(config.redis())
COUNTER = os.environ.get("BENCH_COUNTER", "bench:noop:done")


@app.task(name="bench.noop")
def noop(i: int) -> None:
    _r.incr(COUNTER)
