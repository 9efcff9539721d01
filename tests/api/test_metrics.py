"""``/metrics`` against a real Redis server: the Prometheus text is parsed back and its
values checked against what the ledger, the worker registry and the scheduler wrote."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from farm.api.app import create_app
from farm.config import Config
from farm.jobs import ERROR_STAGES, STATES, Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec
from farm.workers_registry import Assignments, WorkerRegistry
from scheduler.service import Lease
from storage import LocalStore
from tests.servers import free_port

Submit = Callable[..., dict[str, Any]]
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def scrape(client: TestClient) -> Samples:
    """Every sample of ``/metrics``: name -> labels -> value."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in samples.get(name, {}).items()}


def test_jobs_per_state_and_outstanding_images(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    empty = scrape(client)
    assert value(empty, "farm_redis_up") == 1
    assert by_label(empty, "farm_jobs", "state") == dict.fromkeys(STATES, 0)
    assert value(empty, "farm_images_outstanding") == 0
    queued = submit(prompt=["a", "b"], count=3)  # 6 images
    running = submit(count=5, batch_size=2)  # 5 images, 3 tasks
    paused = submit(count=7)
    cancelled = submit(count=2)
    done = submit(count=2)
    failed = submit(count=2)
    assert led.claim(running["id"], 0, "w1") == "ok"
    led.mark(running["id"], [0, 1])
    led.mark(running["id"], [2], ok=False)
    assert led.pause(paused["id"]) == "ok"
    assert led.cancel(cancelled["id"]) == "ok"
    led.mark(done["id"], [0, 1])
    led.mark(failed["id"], [0])
    led.mark(failed["id"], [1], ok=False)
    got = scrape(client)
    want = Counter(client.get(f"/v1/jobs/{j['id']}").json()["state"] for j in (
        queued, running, paused, cancelled, done, failed))  # fmt: skip
    assert by_label(got, "farm_jobs", "state") == {s: want[s] for s in STATES}
    assert set(want) == set(STATES)  # every state has one job
    assert value(got, "farm_images_outstanding") == 6 + (5 - 3)  # the paused job's not
    assert value(got, "farm_jobs_submitted_total") == 6
    assert led.resume(paused["id"]) == "ok"  # back to queued (it never started)
    assert led.retry_failed(failed["id"]) == ("running", 1)
    again = scrape(client)
    assert by_label(again, "farm_jobs", "state") == {
        **{s: want[s] for s in STATES},
        "paused": 0,
        "queued": 2,
        "running": 2,
        "failed": 0,
    }
    assert value(again, "farm_images_outstanding") == 6 + 2 + 7 + 1
    assert value(again, "farm_images_retried_total") == 1


def test_images_counted_once_and_per_model_under_redelivery(
    client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    # the model is the middle digit of the cell number: 2 widths x 3 models x 2 step counts
    spec = JobSpec(
        model="m0",
        prompt=["p", "q"],
        count=2,
        batch_size=4,
        sweep={"width": [256, 512], "model": ["m0", "m1", "m2"], "steps": [5, 10]},
    )
    job = led.create(spec)
    plan = job.plan
    assert plan.total == 48 and plan.n_tasks == 12
    want: Counter[tuple[str, str]] = Counter()
    for task_no in range(plan.n_tasks):
        task = plan.task(task_no)
        model = plan.cell_model(task.cell)
        ok = task_no % 3 != 1  # a third of the tasks fail
        # every task runs twice, as when a worker dies before its ack and the task is
        # delivered again: both runs claim it, mark its images and finish it
        for worker in ("w1", "w2"):
            assert led.claim(job.id, task_no, worker) == "ok"
        for _run in range(2):
            led.mark(job.id, list(task.images), ok=ok)
        assert [led.finish_task(job.id, task_no) for _run in range(2)] == [True, False]
        want[(model, "done" if ok else "failed")] += len(task.images)
    got = scrape(client)
    assert value(got, "farm_images_total", outcome="done") == 32
    assert value(got, "farm_images_total", outcome="failed") == 16
    per_model = {
        (dict(k)["model"], dict(k)["outcome"]): v for k, v in got["farm_model_images_total"].items()
    }
    assert per_model == dict(want)
    assert {m for m, _ in per_model} == {"m0", "m1", "m2"}
    assert value(got, "farm_task_runs_total") == 24
    assert value(got, "farm_tasks_finished_total") == 12
    # a failure after the image was done, or the same marks again, change nothing
    led.mark(job.id, list(range(plan.total)), ok=False)
    led.mark(job.id, list(plan.task(0).images), ok=True)
    same = scrape(client)
    for name in ("farm_images_total", "farm_model_images_total"):
        assert same[name] == got[name]
    # a failed image done at last counts as done, its failure stays counted
    led.mark(job.id, [*plan.task(0).images, plan.task(1).start])
    after = scrape(client)
    assert value(after, "farm_images_total", outcome="done") == 33
    assert value(after, "farm_images_total", outcome="failed") == 16
    m = plan.cell_model(plan.task(1).cell)
    assert value(after, "farm_model_images_total", model=m, outcome="done") == want[(m, "done")] + 1
    # a job without the model layout (submitted before it was kept) counts in the totals
    old = led.create(JobSpec(model="m0", prompt="x", count=3))
    redis_client.hdel(led.job_key(old.id), "model_layout")
    led.mark(old.id, [0, 1])
    led.mark(old.id, [0, 1, 2])  # a mark that is partly new counts the new image only
    last = scrape(client)
    assert value(last, "farm_images_total", outcome="done") == 36
    assert last["farm_model_images_total"] == after["farm_model_images_total"]


def test_task_errors_by_stage(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    job = submit(count=8)
    recorded = ["render", "render", "load", "store", "lost", "render"]
    for stage in recorded:
        assert led.record_error(
            job["id"], 0, [0, 1], stage=stage, error="E: x", worker="w1", model="synthetic",
            images_failed=False,
        )  # fmt: skip
    assert not led.record_error(
        "0123456789abcdef", 0, [0], stage="hang", error="E: x", worker="w1", model="m",
        images_failed=False,
    )  # fmt: skip
    got = by_label(scrape(client), "farm_task_errors_total", "stage")
    assert got == {s: recorded.count(s) for s in ERROR_STAGES}
    assert client.get(f"/v1/jobs/{job['id']}").json()["errors"] == len(recorded)


def test_worker_gauges_from_inventories(
    client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    workers = WorkerRegistry(redis_client, config.namespace)
    gpu = "cuda:0@node1"
    workers.publish(
        gpu,
        {
            "device": "cuda:0",
            "node": "node1",
            "vram_total": 24 * 2**30,
            "vram_free": 9 * 2**30,
            "model": "sdxl",
            "models": {"vram": ["sdxl"], "ram": ["sd15"], "disk": ["sdxl", "sd15", "flux"]},
            "current_task": "abc/3",
            "tasks": 17,
            "images": 68,
            "render_seconds": 91.5,
            "loads": 2,
        },
        ttl=30,
    )
    workers.publish(  # as a CPU worker publishes it: no VRAM figures
        "cpu:0@node2",
        {"device": "cpu:0", "node": "node2", "vram_total": None, "vram_free": None,
         "models": {"vram": [], "ram": [], "disk": []}, "current_task": None},
        ttl=30,
    )  # fmt: skip
    got = scrape(client)
    assert value(got, "farm_workers") == 2
    assert value(got, "farm_worker_info", worker=gpu, device="cuda:0", node="node1") == 1
    assert by_label(got, "farm_worker_vram_total_bytes", "worker") == {gpu: 24 * 2**30}
    assert by_label(got, "farm_worker_vram_free_bytes", "worker") == {gpu: 9 * 2**30}
    assert by_label(got, "farm_worker_busy", "worker") == {gpu: 1, "cpu:0@node2": 0}
    held = {(dict(k)["worker"], dict(k)["model"], dict(k)["tier"]) for k in got[
        "farm_worker_model_info"]}  # fmt: skip
    assert held == {
        (gpu, "sdxl", "vram"),
        (gpu, "sd15", "ram"),
        (gpu, "sdxl", "disk"),
        (gpu, "sd15", "disk"),
        (gpu, "flux", "disk"),
    }
    assert value(got, "farm_worker_images_total", worker=gpu) == 68
    assert value(got, "farm_worker_render_seconds_total", worker=gpu) == 91.5
    assert value(got, "farm_worker_model_loads_total", worker=gpu) == 2
    seen = value(got, "farm_worker_last_seen_timestamp_seconds", worker=gpu)
    assert seen == workers.live()[0]["last_seen"]
    assert value(got, "farm_scheduler_leader") == 0
    assert "farm_scheduler_model_loads_total" not in got
    lease = Lease(redis_client, config.namespace, ttl_s=30)
    assert lease.hold()
    assert Assignments(redis_client, config.namespace).set(gpu, "sdxl", 1.0, "i1")
    workers.remove("cpu:0@node2")
    later = scrape(client)
    assert value(later, "farm_scheduler_leader") == 1
    assert by_label(later, "farm_scheduler_model_loads_total", "worker") == {gpu: 1}
    assert value(later, "farm_workers") == 1
    assert by_label(later, "farm_worker_busy", "worker") == {gpu: 1}
    lease.release()
    assert value(scrape(client), "farm_scheduler_leader") == 0


def test_replicas_answer_the_same(
    submit: Submit,
    client: TestClient,
    config: Config,
    redis_client: redis.Redis,
    store: LocalStore,
) -> None:
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256="0" * 64)
    )
    other = TestClient(create_app(config, redis_client=redis.Redis.from_url(config.redis_url)))
    a = submit(count=6, sweep={"model": ["synthetic", "sd15"]})
    b = other.post("/v1/jobs", json={"model": "sd15", "prompt": "x", "count": 3}).json()
    led = Ledger(redis_client, config.namespace)
    led.mark(a["id"], [0, 1, 2, 6, 7])
    led.mark(a["id"], [3], ok=False)
    led.mark(b["id"], [0])
    assert led.cancel(b["id"]) == "ok"
    WorkerRegistry(redis_client, config.namespace).publish(
        "cuda:1@n", {"device": "cuda:1", "models": {"vram": ["sd15"]}}, ttl=30
    )
    first, second = scrape(client), scrape(other)
    assert first == second
    assert value(first, "farm_jobs_submitted_total") == 2
    assert value(first, "farm_model_images_total", model="sd15", outcome="done") == 3
    assert value(first, "farm_model_images_total", model="synthetic", outcome="done") == 3
    assert value(first, "farm_jobs", state="cancelled") == 1
    fresh = TestClient(create_app(config, redis_client=redis_client, store=store))
    assert scrape(fresh) == first


def test_redis_down_still_answers_with_redis_up_0(config: Config) -> None:
    dead = redis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    got = scrape(TestClient(create_app(config, redis_client=dead)))
    assert got == {"farm_redis_up": {frozenset(): 0.0}}


def test_metrics_is_not_in_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/metrics" not in paths
    assert "/v1/jobs" in paths
    assert client.get("/metrics").status_code == 200


def test_backlog_per_model_from_the_leading_scheduler(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    """The real scheduler's round publishes each model's work left; a paused job's is not
    work, a measured speed prices a model's images, and the record expires unless a
    leading scheduler renews it."""
    from scheduler.service import Scheduler

    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256="0" * 64)
    )
    workers = WorkerRegistry(redis_client, config.namespace)
    for name in ("w1", "w2"):
        workers.publish(name, {"device": "cpu", "instance": name,
                               "image_seconds": {"synthetic:64x64:4": 0.5}}, ttl=30)  # fmt: skip
    assert "farm_model_backlog_images" not in scrape(client)  # no scheduler has led yet
    fast = submit(count=10, width=64, height=64, steps=4, batch_size=2)["id"]
    submit(model="sd15", count=6, width=64, height=64, steps=4)
    held = submit(count=50, width=64, height=64, steps=4)["id"]
    led = Ledger(redis_client, config.namespace)
    assert led.pause(held) == "ok"
    sched = Scheduler(config, redis_client)
    sched.tick()
    got = scrape(client)
    assert by_label(got, "farm_model_backlog_images", "model") == {"synthetic": 10, "sd15": 6}
    # 0.5 s an image measured for synthetic at this shape; sd15 at the default estimate
    assert by_label(got, "farm_model_backlog_seconds", "model") == {
        "synthetic": 5.0, "sd15": 6 * config.default_image_s,
    }  # fmt: skip
    assert by_label(got, "farm_model_workers", "model") == {"synthetic": 1, "sd15": 1}
    led.mark(fast, [0, 1, 2, 3], ok=True)
    led.mark(fast, [4], ok=False)
    sched.tick()
    got = scrape(client)
    assert by_label(got, "farm_model_backlog_images", "model") == {"synthetic": 5, "sd15": 6}
    ttl = redis_client.pttl(f"{config.namespace}:backlog")
    assert 0 < ttl <= max(10.0, 4 * config.leader_ttl) * 1000
