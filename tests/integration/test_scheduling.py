"""Model-affinity scheduling on a real farm: 3 Celery worker processes, 3 tiny models,
2 scheduler processes (one leads), a Redis-compatible server and S3 over HTTP.

Timings come from the ledger's event stream: a Redis stream id starts with the
millisecond the event was written, so every measured duration uses one clock.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec
from storage.models import ModelStore, sha256_file
from tests.cluster import Cluster, tiny_models, wait_for

pytestmark = pytest.mark.timeout(900)
MODELS = ("m0", "m1", "m2")
BASE = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler", "cfg_scale": 4.0}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    tmp = tmp_path_factory.mktemp("sched")
    models = tiny_models(tmp, MODELS)
    env = {"FARM_MIN_DWELL_S": "2", "FARM_LEADER_TTL": "4", "FARM_FAIL_LIMIT": "3"}
    with Cluster(tmp, workers=3, models=models, schedulers=2, env=env) as cluster:
        yield cluster


def submit(farm: Cluster, model: str, **kw: object) -> str:
    spec = JobSpec(**{**BASE, "model": model, "prompt": "a shape", "seed": 3, **kw})
    return farm.ledger.create(spec).id


def events(ledger: Ledger, after: str = "") -> list[tuple[str, dict[str, str]]]:
    return ledger.events(after=after, count=10**6)


def ms(event_id: str) -> int:
    return int(event_id.split("-")[0])


def last_event_id(ledger: Ledger) -> str:
    got = ledger.r.xrevrange(ledger.events_key, count=1)
    return got[0][0].decode() if got else "0-0"


def test_each_worker_loads_exactly_what_the_policy_decided(farm: Cluster) -> None:
    jobs = [submit(farm, MODELS[i % 3], count=8, batch_size=2) for i in range(9)]
    for j in jobs:
        job = farm.wait(j)
        assert (job.state, job.done, job.total) == ("done", 8, 8)
    time.sleep(1.5)  # the workers publish their inventory after every switch and every ~3 s
    decided = farm.assignments_decided()
    inv = farm.inventories()
    own = {name: w["loads"] for name, w in inv.items()}
    print("loads decided by the policy:", decided, "loads counted by the workers:", own)
    assert own == {name: decided.get(name, 0) for name in own}
    assert sum(own.values()) <= 9, "affinity: far fewer loads than jobs switching models"


def test_a_sweep_over_models_renders_its_models_side_by_side(farm: Cluster) -> None:
    """One job sweeping the 3 models: each model's share of it counts for that model in
    placement and is released into that model's queue, so the models render at the same
    time, each on its own worker, rather than one after another."""
    mark = last_event_id(farm.ledger)
    spec = JobSpec(**{**BASE, "model": "m0", "prompt": "a shape", "seed": 5, "count": 20,
                      "batch_size": 2, "steps": 8, "sweep": {"model": list(MODELS)}})  # fmt: skip
    job_id = farm.ledger.create(spec).id
    job = farm.wait(job_id)
    assert (job.state, job.done, job.total) == ("done", 60, 60)
    tpc = job.plan.tasks_per_cell  # cell k (tasks k*tpc...) renders MODELS[k]
    first_start: dict[str, int] = {}
    last_end: dict[str, int] = {}
    models_of: dict[str, set[str]] = {}
    for i, f in events(farm.ledger, after=mark):
        if f.get("job") != job_id or "task" not in f:
            continue
        model = MODELS[int(f["task"]) // tpc]
        if f["type"] == "task-started":
            first_start.setdefault(model, ms(i))
            models_of.setdefault(f["worker"], set()).add(model)
        elif f["type"] == "task-finished":
            last_end[model] = ms(i)
    t0 = min(first_start.values())
    print("first task started / last task finished, ms after the job's first start:",
          {m: (first_start[m] - t0, last_end[m] - t0) for m in MODELS},
          "models each worker rendered:", models_of)  # fmt: skip
    assert set(first_start) == set(last_end) == set(MODELS)
    # every model had started before any model had finished
    assert max(first_start.values()) < min(last_end.values())
    assert len(models_of) == 3


def test_high_priority_job_starts_within_one_task_and_finishes_first(farm: Cluster) -> None:
    low = submit(farm, "m0", count=40, batch_size=1, steps=10, priority=10)
    wait_for(lambda: farm.ledger.get(low).done >= 4, 120, "low job did not start")
    mark = last_event_id(farm.ledger)
    high = submit(farm, "m0", count=3, batch_size=1, steps=10, priority=90)
    evs = events(farm.ledger, after=mark)
    while not any(f["type"] == "task-started" and f["job"] == high for _, f in evs):
        time.sleep(0.05)
        evs = events(farm.ledger, after=mark)
    all_evs = events(farm.ledger)
    queued_at = next(ms(i) for i, f in all_evs if f["type"] == "job-queued" and f["job"] == high)
    first = next(ms(i) for i, f in evs if f["type"] == "task-started" and f["job"] == high)
    starts = {
        f["task"]: ms(i) for i, f in all_evs if f["type"] == "task-started" and f["job"] == low
    }
    ends = {
        f["task"]: ms(i) for i, f in all_evs if f["type"] == "task-finished" and f["job"] == low
    }
    durations = sorted(ends[t] - starts[t] for t in ends if t in starts)
    longest = durations[-1]
    print(f"high job's first task started {first - queued_at} ms after submit; "
          f"low job's tasks take {durations[0]}-{longest} ms")  # fmt: skip
    assert first - queued_at <= longest + 250
    h = farm.wait(high)
    lo = farm.ledger.get(low)
    # it finished first: the low job was still rendering when the high one was done
    assert h.state == "done" and h.finished_at is not None
    assert lo.state == "running" and lo.done < lo.total and lo.finished_at is None
    assert farm.ledger.cancel(low) == "ok"  # the rest of it shows nothing more


def test_pause_stops_new_tasks_and_resume_completes_the_job(farm: Cluster) -> None:
    job_id = submit(farm, "m1", count=30, batch_size=1, steps=8)
    wait_for(lambda: farm.ledger.get(job_id).done >= 3, 120, "job did not start")
    assert farm.ledger.pause(job_id) == "ok"
    paused_at = last_event_id(farm.ledger)
    time.sleep(3.0)
    late = [f for _, f in events(farm.ledger, after=paused_at)
            if f["type"] == "task-started" and f["job"] == job_id]  # fmt: skip
    job = farm.ledger.get(job_id)
    print(f"paused with {job.done} of 30 done, {job.requeued} tasks given back")
    assert late == [] and job.state == "paused" and job.done < 30
    assert farm.ledger.resume(job_id) == "ok"
    job = farm.wait(job_id)
    assert (job.state, job.done, job.failed) == ("done", 30, 0)


def test_retry_renders_failed_images_again(farm: Cluster) -> None:
    from workers.engine.tiny import write_tiny_checkpoint

    path = Path(write_tiny_checkpoint(farm.tmp / "late.safetensors", seed=7))
    sha = sha256_file(path)
    # registered, but its checkpoint is not in storage yet: every load fails
    ModelRegistry(farm.r, farm.config.namespace).add(
        ModelEntry(name="late", engine="sd1", sha256=sha, size=path.stat().st_size)
    )
    job_id = submit(farm, "late", count=4, batch_size=2)
    job = farm.wait(job_id)
    assert (job.state, job.done, job.failed) == ("failed", 0, 4)
    # the worker that failed it FARM_FAIL_LIMIT times is kept off that model
    blocked = [w for w, models in farm.assignments_blocked().items() if "late" in models]
    assert len(blocked) == 1, farm.assignments_blocked()
    # the job says why: each failed load of its model on that worker, in a run of each
    # task (its images failed) or ahead of its tasks (the worker preloads what it is given)
    errors = farm.ledger.errors(job_id)
    assert len(errors) == farm.ledger.get(job_id).errors >= 2
    assert {(e["stage"], e["model"], e["worker"]) for e in errors} == {("load", "late", blocked[0])}
    assert all(e["error"].startswith("ObjectNotFound: ") and sha in e["error"] for e in errors)
    in_task = [e for e in errors if e["task"] is not None]
    assert {e["task"] for e in in_task} == {0, 1} and all(e["images_failed"] for e in in_task)
    ahead = [e for e in errors if e["task"] is None]
    assert all(e["images"] == [] and not e["images_failed"] for e in ahead)
    ModelStore(farm.store, farm.tmp / "upload-cache").add(path)
    mark = last_event_id(farm.ledger)
    state, n = farm.ledger.retry_failed(job_id)
    assert (state, n) == ("running", 4)
    job = farm.wait(job_id)
    assert (job.state, job.done, job.failed) == ("done", 4, 0)
    assert farm.ledger.get(job_id).errors == len(errors)  # the history stays
    renderers = {f["worker"] for _, f in events(farm.ledger, after=mark)
                 if f["type"] == "task-started" and f["job"] == job_id}  # fmt: skip
    assert renderers and blocked[0] not in renderers


def test_sigkill_of_a_worker_mid_task_loses_nothing(farm: Cluster) -> None:
    job_id = submit(farm, "m2", count=24, batch_size=2, steps=12)
    running: dict[str, list[tuple[str, int]]] = {}

    def some_task_running() -> bool:
        nonlocal running
        running = {k: v for k, v in farm.ledger.running().items()
                   if any(j == job_id for j, _ in v)}  # fmt: skip
        return bool(running)

    wait_for(some_task_running, 120, "no task of the job started")
    instance, tasks = next(iter(running.items()))
    task_no = next(t for j, t in tasks if j == job_id)
    victim = next(w for w in farm.inventories().values() if w["instance"] == instance)
    mark = last_event_id(farm.ledger)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.time()
    job = farm.wait(job_id, timeout=300)
    assert (job.state, job.done, job.failed, job.total) == ("done", 24, 0, 24)
    done_bits = farm.r.bitcount(farm.ledger.job_key(job_id, "done"))
    assert done_bits == 24 and job.tasks_finished == job.n_tasks
    again = next(ms(i) for i, f in events(farm.ledger, after=mark)
                 if f["type"] == "task-started" and f["job"] == job_id
                 and f["task"] == str(task_no))  # fmt: skip
    recovery = again / 1000 - killed_at
    print(
        f"task {task_no} of the killed worker {victim['name']} started again after "
        f"{recovery:.1f} s (heartbeat TTL {farm.config.worker_ttl} s)"
    )
    assert recovery < 30


def test_leader_failover_resumes_releases(farm: Cluster) -> None:
    job_id = submit(farm, "m0", count=40, batch_size=1, steps=6)
    wait_for(lambda: farm.ledger.get(job_id).done >= 3, 120, "job did not start")
    leader = farm.leader_pid()
    assert leader in [p.pid for p in farm.scheduler_procs]
    mark = last_event_id(farm.ledger)
    os.kill(leader, signal.SIGKILL)
    killed_at = time.time()
    # the dying leader may still have released a task as the signal landed: count only
    # releases made once another scheduler holds the lease
    wait_for(lambda: farm.leader_pid() not in (None, leader), 30, "no new leader")
    new_leader = farm.leader_pid()
    cursor = farm.ledger.get(job_id).cursor

    def released_by_new_leader() -> bool:
        job = farm.ledger.get(job_id)
        return job.cursor > cursor or job.state == "done"

    wait_for(released_by_new_leader, 30, "no task released after the leader died")
    resumed = time.time() - killed_at
    print(f"new leader {new_leader} released task {cursor} {resumed:.1f} s after the kill")
    assert resumed < 15
    job = farm.wait(job_id)
    assert (job.state, job.done) == ("done", 40)
    assert any(f["type"] == "task-started" for _, f in events(farm.ledger, after=mark))
