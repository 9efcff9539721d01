"""What the scheduler reads each round, against a real Redis server: the active jobs in one
round trip with each spec read once, released-but-unclaimed tasks looked for only every
quarter of ``resend_after``, messages the broker lost sent again within seconds, and lanes
that cost no more for a sweep of many cells."""

from __future__ import annotations

import base64
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from farm.celery_app import UNACKED_KEY, held_tasks, model_queue, queue_lists
from farm.config import Config
from farm.jobs import JobRecord, Ledger
from farm.spec import JobSpec
from scheduler.service import LOST_LOOK_S, Scheduler, job_lanes

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


def test_a_message_the_broker_lost_is_sent_again_at_the_second_look(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched = Scheduler(config, redis_client)
    job = submit(count=32, batch_size=2)["id"]
    lists = queue_lists(model_queue(config.namespace, "synthetic"))
    t0 = time.time()
    sched.tick(now=t0)  # releases and sends
    sent = held_tasks(redis_client, config.namespace, ["synthetic"])
    pending = {int(t) for t in redis_client.zrange(sched.ledger.job_key(job, "pending"), 0, -1)}
    assert len(sent) >= 3 and sent == {(job, t) for t in pending}

    def take() -> tuple[bytes, int]:
        """What a worker's BRPOP does: the oldest message of the first list that has one."""
        for key in lists:
            raw = redis_client.rpop(key)
            if raw is not None:
                msg = json.loads(raw)
                (_, kwargs, _) = json.loads(base64.b64decode(msg["body"]))
                return raw, kwargs["task_no"]
        raise AssertionError("no message queued")

    lost_raw, lost = take()  # the worker was cut off before it recorded the message
    acked_raw, unacked = take()  # recorded as kombu's QoS does: not lost
    redis_client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(acked_raw), "", "x"]))
    _, claimed = take()  # taken, claimed and rendered, as a worker does
    assert sched.ledger.claim(job, claimed, "w1") == "ok"
    assert sched.ledger.finish_task(job, claimed)
    assert (job, lost) not in held_tasks(redis_client, config.namespace, ["synthetic"])

    sched.tick(now=t0 + LOST_LOOK_S)  # first look: missing once is not enough
    assert sched.recovered == 0 and sched.missing == {(job, lost)}
    sched.tick(now=t0 + LOST_LOOK_S * 1.5)  # too soon for another look
    assert sched.recovered == 0
    sched.tick(now=t0 + LOST_LOOK_S * 2)  # second look: still missing, so sent again
    assert sched.recovered == 1 and sched.missing == set()
    held = held_tasks(redis_client, config.namespace, ["synthetic"])
    assert (job, lost) in held and (job, unacked) in held and (job, claimed) not in held
    # its release time was renewed, so resend_after counts from now
    score = redis_client.zscore(sched.ledger.job_key(job, "pending"), str(lost))
    assert score == t0 + LOST_LOOK_S * 2
    sched.tick(now=t0 + LOST_LOOK_S * 4)
    assert sched.recovered == 1  # nothing else is missing
    redis_client.hdel(UNACKED_KEY, "tag-1")


def test_held_tasks_reads_render_messages_of_its_namespace_only(
    redis_client: redis.Redis, config: Config
) -> None:
    queue = model_queue(config.namespace, "m")
    message = {
        "body": base64.b64encode(
            json.dumps(
                [[], {"namespace": config.namespace, "job_id": "j", "task_no": 4}, {}]
            ).encode()
        ).decode(),
        "headers": {"task": "farm.render"},
        "properties": {"body_encoding": "base64"},
    }
    other_ns = json.loads(json.dumps(message))
    other_ns["body"] = base64.b64encode(
        json.dumps([[], {"namespace": "elsewhere", "job_id": "j", "task_no": 5}, {}]).encode()
    ).decode()
    other_task = {**message, "headers": {"task": "something.else"}}
    redis_client.lpush(queue + ":7", json.dumps(message), json.dumps(other_ns))
    redis_client.lpush(queue, json.dumps(other_task), b"not json", b"{}")
    assert held_tasks(redis_client, config.namespace, ["m"]) == {("j", 4)}
    assert held_tasks(redis_client, config.namespace, ["n"]) == set()


def reference_lanes(job: JobRecord) -> dict[str, tuple[tuple[int, ...], int]]:
    """The lanes the slow way: every cell, its cursor spelled out."""
    plan, tpc = job.plan, job.plan.tasks_per_cell
    back = Counter(t // tpc for t in job.requeue_tasks)
    unreleased: dict[str, int] = defaultdict(int)
    cells: dict[str, list[int]] = defaultdict(list)
    for cell in range(plan.n_cells):
        lo = cell * tpc
        cur = lo + tpc if cell < job.full_cells else job.cell_cursors.get(cell, lo)
        left = lo + tpc - cur + back[cell]
        if left > 0:
            model = plan.cell_settings(cell)["model"]
            unreleased[model] += left
            cells[model].append(cell)
    return {m: (tuple(cells[m]), unreleased[m]) for m in plan.models()}


def test_lanes_match_every_cell_spelled_out_as_a_sweep_is_released(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    # cells: model (a, b, a) x cfg (3, 5) x steps (5, 10, 20) = 18 cells of 2 tasks
    led = Ledger(redis_client, config.namespace)
    job_id = led.create(
        JobSpec(model="a", prompt="p", count=4, batch_size=2, seed=1,
                sweep={"model": ["a", "b", "a"], "cfg_scale": [3, 5], "steps": [5, 10, 20]})
    ).id  # fmt: skip
    rng = random.Random(5)
    done: set[int] = set()
    while True:
        (job,) = [j for j in led.active() if j.id == job_id]
        ref = reference_lanes(job)
        for most in (None, 1, 3):
            lanes = job_lanes(job, max_cells=most)
            for model, (cells, unreleased) in ref.items():
                assert lanes[model].unreleased == unreleased, (model, most)
                assert lanes[model].cells == cells[:most], (model, most)
        lanes = job_lanes(job)
        if not any(lane.unreleased for lane in lanes.values()):
            break
        model = rng.choice([m for m, lane in lanes.items() if lane.unreleased])
        n = rng.randint(1, 5)
        out = led.release(job_id, n, lanes[model].cells[:n], job.plan.tasks_per_cell)
        assert 1 <= len(out) <= n
        for t in out:
            assert job.plan.task_model(t) == model
            if rng.random() < 0.3 and t not in done:  # fails once, is retried
                task = job.plan.task(t)
                led.mark(job_id, list(range(task.start, task.end)), ok=False)
                assert led.retry_failed(job_id)[1] == task.end - task.start
            else:
                done.add(t)
    # every task is out: the hash keeps no cursor field
    fields = [k for k in redis_client.hkeys(led.job_key(job_id)) if k.startswith(b"c:")]
    assert fields == [] and redis_client.hget(led.job_key(job_id), "full") == b"18"


def test_a_job_hash_stays_small_however_many_cells(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    # 4,800 cells of one task, released in order as the scheduler does
    job_id = submit(
        count=1, sweep={"cfg_scale": [1 + k / 100 for k in range(20)],
                        "steps": list(range(1, 21)), "width": [64 * k for k in range(1, 13)]},
    )["id"]  # fmt: skip
    led = Ledger(redis_client, config.namespace)
    key = led.job_key(job_id)
    sizes = []
    while True:
        (job,) = [j for j in led.active() if j.id == job_id]
        lane = job_lanes(job, max_cells=1000)["synthetic"]
        if not lane.unreleased:
            break
        assert len(lane.cells) == min(1000, lane.unreleased)
        got = led.release(job_id, 999, lane.cells, 1)
        assert got == list(lane.cells[:999])
        sizes.append(redis_client.hlen(key))
    assert len(sizes) == -(-4800 // 999) and max(sizes) <= 25, sizes
    # a job the previous version left with a field per cell gives them up at its next release
    old = submit(count=2, batch_size=1, sweep={"cfg_scale": [3, 5, 7]})["id"]
    okey = led.job_key(old)
    assert led.release(old, 5, [0, 1, 2], 2) == [0, 1, 2, 3, 4]
    redis_client.hdel(okey, "full")
    redis_client.hset(okey, mapping={"c:0": 2, "c:1": 4})
    assert led.get(old).cell_cursors == {0: 2, 1: 4, 2: 5}
    assert led.release(old, 5, [2], 2) == [5]
    assert [k for k in redis_client.hkeys(okey) if k.startswith(b"c:")] == []
    assert led.get(old).full_cells == 3


def test_a_job_needing_a_feature_waits_while_a_worker_on_its_model_lacks_it(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    """A rolling upgrade: a worker older than a feature reads a job without it and would
    render the wrong images, so the scheduler sends such a job nothing while one holds its
    model, and nothing before any worker holds it; a job that needs nothing goes on."""
    from farm.spec import FEATURES
    from farm.workers_registry import WorkerRegistry

    workers = WorkerRegistry(redis_client, config.namespace)
    led = Ledger(redis_client, config.namespace)
    sched = Scheduler(config, redis_client)

    def pending(job_id: str) -> int:
        return len(redis_client.zrange(led.job_key(job_id, "pending"), 0, -1))

    base = {"model": "synthetic", "prompt": "p", "count": 8, "batch_size": 2, "seed": 1}
    hires = led.create(JobSpec(**base, hires={"scale": 2})).id
    plain = submit(count=8, batch_size=2)["id"]
    t0 = time.time()
    sched.tick(now=t0)  # no worker holds the model: the plain job's tasks wait in its queue
    assert pending(plain) > 0 and pending(hires) == 0
    assert led.get(hires).spec.needs() == {"hires"}
    assert JobSpec(**base, sweep={"clip_skip": [1, 2]}).needs() == {"clip_skip"}
    assert JobSpec(**base, subseed_strength=0.5).needs() == {"variation_seeds"}
    assert JobSpec(**base).needs() == frozenset()

    workers.publish("old", {"device": "cpu"}, ttl=60)  # an inventory without "features"
    sched.tick(now=t0 + 1)
    assert sched.assignments.get("old") is not None  # it holds the model ...
    assert pending(hires) == 0 and sched.held_back == {(hires, "synthetic")}  # ... so: wait

    workers.publish("old", {"device": "cpu", "features": list(FEATURES)}, ttl=60)  # updated
    assert led.cancel(plain) == "ok"  # its released tasks took the model's queue slots
    sched.tick(now=t0 + 2)
    assert sched.held_back == set() and pending(hires) > 0
