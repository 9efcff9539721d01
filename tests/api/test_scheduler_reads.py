"""What the scheduler reads each round, against a real Redis server: the active jobs in one
round trip with each spec read once, and released-but-unclaimed tasks looked for only every
quarter of ``resend_after``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from farm.config import Config
from farm.jobs import Ledger
from scheduler.service import Scheduler

Submit = Callable[..., dict[str, Any]]


def test_active_reads_a_spec_once_and_forgets_finished_jobs(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    a = submit(prompt=["one", "two"], count=2)
    b = submit(prompt="three", count=3, sweep={"cfg_scale": [3, 5]})
    led = Ledger(redis_client, config.namespace)
    first = {j.id: j for j in led.active()}
    assert set(first) == {a["id"], b["id"]}
    assert first[b["id"]].spec.prompts == ["three"] and first[b["id"]].plan.n_cells == 2
    # the stored spec never changes after submit; if it did, this ledger would not see it
    key = led.job_key(a["id"])
    stored = json.loads(redis_client.hget(key, "spec") or b"{}")
    redis_client.hset(key, "spec", json.dumps({**stored, "prompt": "changed"}))
    redis_client.hset(key, "priority", 90)  # the other fields are read every time
    again = {j.id: j for j in led.active()}
    assert again[a["id"]].spec.prompts == ["one", "two"]
    assert again[a["id"]].priority == 90
    assert again[a["id"]].total == first[a["id"]].total == 4
    # a ledger that never saw the job reads the spec as it is stored
    fresh = {j.id: j for j in Ledger(redis_client, config.namespace).active()}
    assert fresh[a["id"]].spec.prompts == ["changed"]
    # a job that leaves the active set is forgotten
    assert led.cancel(b["id"]) == "ok"
    assert [j.id for j in led.active()] == [a["id"]]
    assert set(led._specs) == {a["id"]}


def test_stale_releases_of_many_jobs_at_once(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    jobs = [submit(count=8, batch_size=2)["id"] for _ in range(3)]
    assert led.release(jobs[0], 2) == [0, 1]
    assert led.release(jobs[2], 1) == [0]
    assert led.claim(jobs[2], 0, "w1") == "ok"  # claimed: not stale
    assert led.release(jobs[2], 1) == [1]
    now = time.time() + 50
    assert led.stale_releases(jobs, 100.0, now) == {}  # none older than 100 s
    assert led.stale_releases(jobs, 10.0, now) == {jobs[0]: [0, 1], jobs[2]: [1]}
    # their release time was renewed: not stale again until older_than has passed anew
    assert led.stale_releases(jobs, 10.0, now + 5) == {}
    assert led.stale_releases(jobs, 10.0, now + 11) == {jobs[0]: [0, 1], jobs[2]: [1]}
    assert led.stale_releases([], 0.0, now) == {}


def test_the_scheduler_looks_for_unclaimed_tasks_every_quarter_of_resend_after(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched = Scheduler(replace(config, resend_after=100.0), redis_client)
    job = submit(count=32, batch_size=2)["id"]
    t0 = time.time()
    sched.tick(now=t0)  # takes the lead, looks at once (nothing yet), then releases
    out = len(redis_client.zrange(sched.ledger.job_key(job, "pending"), 0, -1))
    assert out > 0 and sched.recovered == 0
    sched.tick(now=t0 + 90)  # a look: nothing is 100 s old yet
    assert sched.recovered == 0 and sched.last_stale_scan == t0 + 90
    sched.tick(now=t0 + 110)  # every task is stale now, but the last look was 20 s ago
    assert sched.recovered == 0 and sched.last_stale_scan == t0 + 90
    sched.tick(now=t0 + 115)  # 25 s after the last look: all sent again, once
    assert sched.recovered == out and sched.last_stale_scan == t0 + 115
    sched.tick(now=t0 + 141)  # renewed at the look: not stale again yet
    assert sched.recovered == out
    # a scheduler that takes over from another sends every unclaimed task at once
    other = Scheduler(replace(config, resend_after=100.0), redis_client)
    sched.lease.release()
    other.tick(now=t0 + 142)
    assert other.leader and other.recovered == out
