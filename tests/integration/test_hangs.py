"""Workers that hang, and a task that its workers die of, on a real farm: 2 Celery worker
processes under the launcher, a scheduler, a Redis-compatible server and a store on a
local directory (which is what a shared model mount looks like to a worker).

- A worker whose model load hangs (a read that never returns, as from a hard-mounted NFS
  share that went away) ends itself after FARM_STALL_TIMEOUT seconds without progress;
  the launcher starts it again and the model is kept off it. Renders that take several
  times that limit but report every step are not taken for hangs.
- A task whose worker dies under it FARM_TASK_LOSSES times fails its images instead of
  killing worker after worker; a retry renders them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from farm.models import ModelRegistry
from farm.spec import JobSpec
from storage.keys import model_key
from tests.cluster import Cluster, tiny_models, wait_for
from workers.runtime import STALL_EXIT

pytestmark = pytest.mark.timeout(600)
STALL_S = 3.0
BASE = {"width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 4.0}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    tmp = tmp_path_factory.mktemp("hangs")
    models = tiny_models(tmp, ("good", "stuck"))
    env = {
        "FARM_STALL_TIMEOUT": str(STALL_S),
        "FARM_WORKER_TTL": "4",
        "FARM_FAIL_LIMIT": "1",  # one hang keeps a worker off the model
        "FARM_MIN_DWELL_S": "1",
    }
    with Cluster(tmp, workers=2, models=models, env=env, local_store=True) as cluster:
        yield cluster


def submit(farm: Cluster, model: str, **kw: object) -> str:
    spec = JobSpec(**{**BASE, "model": model, "prompt": "a shape", "seed": 5, **kw})
    return farm.ledger.create(spec).id


def events_since(farm: Cluster, mark: str) -> list[tuple[str, dict[str, str]]]:
    return farm.ledger.events(after=mark, count=10**6)


def last_event_id(farm: Cluster) -> str:
    got = farm.r.xrevrange(farm.ledger.events_key, count=1)
    return got[0][0].decode() if got else "0-0"


def task_seconds(events: list[tuple[str, dict[str, str]]], job_id: str) -> list[float]:
    """How long each run of the job's tasks took, from its start to its finish."""
    started: dict[str, int] = {}
    out = []
    for event_id, f in events:
        if f.get("job") != job_id:
            continue
        at = int(event_id.split("-")[0])
        if f["type"] == "task-started":
            started[f["task"]] = at
        elif f["type"] == "task-finished" and f["task"] in started:
            out.append((at - started.pop(f["task"])) / 1000)
    return out


def test_a_worker_hung_in_a_model_load_ends_itself_and_the_model_is_kept_off_it(
    farm: Cluster,
) -> None:
    entry = ModelRegistry(farm.r, farm.config.namespace).get("stuck")
    assert entry is not None
    blob = farm.tmp / "store" / model_key(entry.sha256)
    blob.unlink()
    os.mkfifo(blob)  # opening it for reading waits for a writer that never comes
    mark = last_event_id(farm)
    names = set(farm.inventories())
    # long tasks on a good model: 60 steps, several times the stall limit per task
    good = submit(farm, "good", count=4, batch_size=2, steps=60)
    stuck = submit(farm, "stuck", count=2, batch_size=2, steps=4)

    def stalls() -> list[dict[str, str]]:
        return [f for _, f in events_since(farm, mark) if f["type"] == "worker-stalled"]

    wait_for(lambda: len(stalls()) >= 2, 240, "the workers did not end their hung loads")
    job = farm.wait(good, timeout=300)
    assert (job.state, job.done, job.failed) == ("done", 4, 0)
    found = stalls()
    for f in found:
        print(f"{f['worker']}: {f['stage']} ended after {f['seconds']} s without progress")
        assert (f["stage"], f["model"]) == ("loading model stuck", "stuck")
        assert STALL_S <= float(f["seconds"]) < STALL_S + 2  # checked every 0.6 s
    assert {f["worker"] for f in found} == names  # each hung once, then kept off it
    log = farm.worker_log()
    assert log.count(f"exited with {STALL_EXIT}; restarting") == len(found)
    assert "where it hangs:" in log and "in get_file" in log  # the stuck thread's stack
    blocked = farm.assignments_blocked()
    assert all("stuck" in blocked.get(n, set()) for n in names), blocked
    # the renders ran longer than the limit, reporting progress: none was taken for a hang
    runs = task_seconds(events_since(farm, mark), good)
    print(f"tasks of the good model took {min(runs):.1f}-{max(runs):.1f} s each")
    assert max(runs) > STALL_S
    wait_for(lambda: set(farm.inventories()) == names, 120, "the workers did not come back")
    # no worker can load the hung model now: its job waits, none of its images failed
    rec = farm.ledger.get(stuck)
    assert (rec.done, rec.failed, rec.state) == (0, 0, "queued")
    # ... and says why: each worker hung loading its model (ahead of the job's tasks, or
    # in one, which then went to another worker)
    errors = farm.ledger.errors(stuck)
    hangs = [e for e in errors if e["stage"] == "hang"]
    assert sorted(e["worker"] for e in hangs) == sorted(f["worker"] for f in found)
    assert all("s while loading model stuck (FARM_STALL_TIMEOUT=3)" in e["error"] for e in hangs)
    assert all(e["model"] == "stuck" and not e["images_failed"] for e in errors)
    assert {e["stage"] for e in errors} <= {"hang", "lost"} and rec.errors == len(errors)
    assert farm.ledger.cancel(stuck) == "ok"


def test_a_task_its_workers_die_of_fails_after_three_deaths_and_a_retry_renders_it(
    farm: Cluster,
) -> None:
    assert farm.config.task_losses == 3
    wait_for(lambda: len(farm.inventories()) == 2, 120, "the workers are not up")
    mark = last_event_id(farm)
    job_id = submit(farm, "good", count=8, batch_size=2, steps=30)
    poisoned = 1  # every worker that claims this task dies, as if it crashed the driver
    killed: list[str] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            for instance, tasks in farm.ledger.running().items():
                if (job_id, poisoned) in tasks and instance not in killed:
                    pids = [w["pid"] for w in farm.inventories().values()
                            if w["instance"] == instance]  # fmt: skip
                    if pids:
                        os.kill(pids[0], signal.SIGKILL)
                        killed.append(instance)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        job = farm.wait(job_id, timeout=300)
    finally:
        stop.set()
        thread.join()
    events = events_since(farm, mark)
    failed = [f for _, f in events if f["type"] == "task-failed" and f["job"] == job_id]
    print(f"task {poisoned} killed {len(killed)} worker processes, then its images failed")
    assert len(killed) == 3 and len(failed) == 1
    assert (failed[0]["task"], failed[0]["losses"]) == (str(poisoned), "3")
    # its 2 images failed (or 1, if a worker stored one before it died); the rest is done
    assert job.state == "failed" and 1 <= job.failed <= 2 and job.done + job.failed == 8
    at = next(n for n, (_, f) in enumerate(events) if f["type"] == "task-failed")
    restarted = [f for _, f in events[at:] if f["type"] == "task-started"
                 and f["job"] == job_id and f["task"] == str(poisoned)]  # fmt: skip
    assert restarted == []  # no fourth worker was sent to it
    errors = farm.ledger.errors(job_id)
    assert [(e["task"], e["stage"], e["images_failed"]) for e in errors] == [
        (poisoned, "lost", True), (poisoned, "lost", False), (poisoned, "lost", False)
    ]  # fmt: skip
    assert {e["worker"] for e in errors} == {i.partition("#")[0] for i in killed}
    assert "(3 of FARM_TASK_LOSSES=3); its images fail" in errors[0]["error"]

    assert farm.ledger.retry_failed(job_id)[1] == job.failed
    job = farm.wait(job_id, timeout=300)
    assert (job.state, job.done, job.failed) == ("done", 8, 0)
