"""End to end on real servers: Redis-compatible server, S3 over HTTP, two Celery workers.

The workers render with the real SD1.x engine on a tiny random-weight checkpoint in the
original single-file layout, fetched from S3 into their own cache.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from farm.celery_app import RenderMessage, send_render
from farm.spec import JobSpec
from storage.keys import image_key
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster, tiny_models

pytestmark = pytest.mark.timeout(900)

BASE = {
    "model": "tiny",
    "width": 64,
    "height": 64,
    "steps": 6,
    "cfg_scale": 5.0,
    "sampler_name": "Euler a",
}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    tmp = tmp_path_factory.mktemp("farm")
    with Cluster(tmp, workers=2, models=tiny_models(tmp, ("tiny",))) as cluster:
        yield cluster


def submit(farm: Cluster, **kw: object) -> str:
    return farm.ledger.create(JobSpec(**{**BASE, **kw}), farm.config.default_batch_size).id


def png_at(farm: Cluster, job_id: str, index: int, seed: int, prefix: str = "renders") -> bytes:
    return farm.store.get_bytes(image_key(prefix, job_id, index, seed))


def all_events(farm: Cluster, after: str = "") -> list[tuple[str, dict[str, str]]]:
    return farm.ledger.events(after=after, count=10**6)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_job_of_40_images_over_prompts_repeats_and_a_sweep(farm: Cluster) -> None:
    job_id = submit(
        farm,
        prompt=["a red circle", "a blue square"],
        count=10,
        seed=1234,
        sweep={"cfg_scale": [3.0, 7.5]},
        batch_size=4,
        output_prefix="e2e",
    )
    job = farm.wait(job_id)
    assert (job.state, job.done, job.failed, job.total) == ("done", 40, 0, 40)
    plan = job.plan
    keys = set()
    for k in range(40):
        p = plan.image(k)
        key = image_key("e2e", job_id, k, p.seed)
        keys.add(key)
        data = farm.store.get_bytes(key)  # raises if missing
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (64, 64)
        params = parse_parameters(read_parameters(data) or "")
        assert params["prompt"] == p.prompt
        assert params["seed"] == p.seed and params["cfg_scale"] == p.cfg_scale
        assert (params["width"], params["height"], params["model"]) == (64, 64, "tiny")
    listed = {
        o["Key"]
        for o in farm.s3.list_objects_v2(Bucket=farm.bucket, Prefix=f"out/e2e/{job_id}/")[
            "Contents"
        ]
    }
    assert listed == {"out/" + k for k in keys}
    # both worker processes took part
    workers = {f["worker"] for _, f in all_events(farm) if f.get("job") == job_id
               and f["type"] == "task-started"}  # fmt: skip
    assert len(workers) == 2, workers


def test_same_seed_same_image_in_a_batch_alone_and_on_either_worker(farm: Cluster) -> None:
    prompts = ["a green triangle", "a yellow circle", "a white square", "a black star"]
    batch_job = submit(farm, prompt=prompts, count=1, seed=77, batch_size=4)
    # image 2 of the batch: prompt "a white square", seed 77; now the same image alone,
    # many times, so that both workers render it
    alone = [submit(farm, prompt="a white square", seed=77, batch_size=1) for _ in range(6)]
    for j in [batch_job, *alone]:
        assert farm.wait(j).state == "done"
    ref = pixels(png_at(farm, batch_job, 2, 77))
    assert ref.std() > 0  # a real render, not a blank picture
    by_worker: dict[str, list[float]] = {}
    for j in alone:
        worker = next(f["worker"] for _, f in all_events(farm)
                      if f.get("job") == j and f["type"] == "task-started")  # fmt: skip
        diff = np.abs(pixels(png_at(farm, j, 0, 77)) - ref).max()
        by_worker.setdefault(worker, []).append(float(diff))
    print("max abs diff (of 255) by worker:", by_worker)
    assert len(by_worker) == 2, "both workers should have rendered it"
    assert max(max(v) for v in by_worker.values()) <= 1


def test_a_task_delivered_twice_counts_and_writes_once(farm: Cluster) -> None:
    # a worker consumes the model's queue before the scheduler is held back, whether or not
    # another test ran first: a held scheduler places no model
    farm.wait(submit(farm, prompt="a first task", count=1, seed=1))
    farm.sched_enabled.clear()  # release by hand
    try:
        job_id = submit(farm, prompt="a purple circle", count=6, seed=5, batch_size=2)
        released = farm.ledger.release(job_id, 10)
        assert list(released) == [0, 1, 2]
        app = farm.celery()
        for task_no in (0, 0, 1, 2, 1):
            msg = RenderMessage(namespace=farm.config.namespace, job_id=job_id, task_no=task_no)
            send_render(app, msg, "tiny", 50)
        job = farm.wait(job_id)
        time.sleep(1.0)  # let the duplicates drain
        job = farm.ledger.get(job_id)
        assert (job.state, job.done, job.failed, job.tasks_finished) == ("done", 6, 0, 3)
        first = [png_at(farm, job_id, k, 5 + k) for k in range(6)]
        # a redelivery after a crash between upload and ledger update renders again
        from workers.render import _render_images
        from workers.runtime import Runtime

        rt = Runtime(farm.config, name="test-redelivery")
        plan = job.plan
        _render_images(rt, job_id, 0, "renders", [plan.image(k) for k in range(0, 2)])
        after = farm.ledger.get(job_id)
        assert (after.done, after.failed, after.state) == (6, 0, "done")
        again = [png_at(farm, job_id, k, 5 + k) for k in range(6)]
        for a, b in zip(first, again, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
        listed = farm.s3.list_objects_v2(Bucket=farm.bucket, Prefix=f"out/renders/{job_id}/")
        assert listed["KeyCount"] == 6
    finally:
        farm.sched_enabled.set()


def test_cancel_stops_new_tasks_and_keeps_finished_images(farm: Cluster) -> None:
    job_id = submit(farm, prompt="a orange square", count=60, seed=9, batch_size=1, steps=8)
    deadline = time.monotonic() + 120
    while farm.ledger.get(job_id).done < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert farm.ledger.cancel(job_id) == "ok"
    cancel_event = next(
        i for i, f in all_events(farm) if f["type"] == "job-cancelled" and f["job"] == job_id
    )
    job = farm.wait(job_id)
    assert job.state == "cancelled"
    assert 3 <= job.done < 60
    late_starts = [
        f for _, f in all_events(farm, after=cancel_event)
        if f.get("job") == job_id and f["type"] == "task-started"
    ]  # fmt: skip
    assert late_starts == []
    for k in range(60):
        key = image_key("renders", job_id, k, 9 + k)
        assert farm.store.exists(key) == farm.ledger.is_done(job_id, k)
    assert farm.ledger.cancel(job_id) == "cancelled"  # cancelling again changes nothing


def test_worker_answers_and_heartbeats_during_a_render_and_keeps_its_model(farm: Cluster) -> None:
    job_id = submit(farm, prompt="a long render", count=8, batch_size=8, steps=20, seed=3)
    deadline = time.monotonic() + 120
    while not farm.ledger.running():
        assert time.monotonic() < deadline, "the task did not start"
        time.sleep(0.05)
    instance = next(iter(farm.ledger.running()))
    name = instance.split("#")[0]
    app = farm.celery()
    replies, beats = [], set()
    while farm.ledger.running().get(instance):
        # a Celery control command is answered while the render runs (threads pool)
        got = app.control.ping(destination=[name], timeout=1.0)
        replies.append(bool(got))
        beats.add(farm.inventories()[name]["last_seen"])
        time.sleep(0.5)
    job = farm.wait(job_id)
    assert job.state == "done"
    print(f"{len(replies)} pings during the render, {sum(replies)} answered; "
          f"{len(beats)} distinct inventory heartbeats")  # fmt: skip
    assert len(replies) >= 3 and all(replies)
    assert len(beats) >= 2
    # a worker loads its model once, however many tasks it runs
    inv = farm.inventories()
    assert inv[name]["loads"] == 1 and inv[name]["tasks"] > 1
    assert all(w["loads"] <= 1 for w in inv.values())


def test_tasks_released_but_never_sent_go_out_again(farm: Cluster) -> None:
    from dataclasses import replace

    farm.sched_enabled.clear()
    original = farm.scheduler.config
    try:
        job_id = submit(farm, prompt="a lost message", count=4, seed=11, batch_size=2)
        # a scheduler that dies right after reserving tasks, before sending them
        assert farm.ledger.release(job_id, 2) == [0, 1]
        farm.scheduler.config = replace(original, resend_after=1.0)
        time.sleep(1.2)
        farm.sched_enabled.set()
        job = farm.wait(job_id, timeout=120)
        assert (job.state, job.done, job.failed) == ("done", 4, 0)
        resent = farm.scheduler.recovered
        assert resent >= 2
    finally:
        farm.scheduler.config = original
        farm.sched_enabled.set()
