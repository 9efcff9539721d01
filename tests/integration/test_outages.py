"""Outages of the parts a farm depends on, on real servers.

Redis crashes and comes back mid-job, on a real farm: 2 Celery worker processes on 2 tiny
models, 2 scheduler processes, a Redis-compatible server with an append-only file (killed
with SIGKILL and started again on the same port) and S3 over HTTP. Redis is the broker and
the ledger at once, so while it is away nothing can be claimed, marked or sent. What must
hold when it is back: every image is done exactly once and none is failed (an outage is
not the model's fault), the tasks that were rendering when it died finish without waiting
for the broker's visibility timeout, and every process of the farm is still running.

The same farm with its S3 endpoint refusing connections for longer than boto3's own
retries: the workers wait for the store, and every image is stored and done, none failed.

Then a worker's runtime on its own: model switches cut off by Redis or by the store,
waits for Redis, storage that takes no images, and a worker that stops while its store is
away.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from farm.celery_app import RenderMessage, model_queue
from farm.config import Config
from farm.models import ModelEntry, ModelRegistry
from farm.spec import JobSpec
from farm.workers_registry import Assignments
from storage import LocalStore, StorageError
from tests.cluster import Cluster, tiny_models, wait_for
from tests.servers import RedisServer

pytestmark = pytest.mark.timeout(600)
MODELS = ("m0", "m1")
TTL_S = 6  # heartbeat TTL of the workers' inventories
PERSIST = ("--appendonly", "yes", "--appendfsync", "always")  # every write on disk


def recovery_after(farm: Cluster, since_ms: int, job: str | None = None) -> float:
    """Seconds from ``since_ms`` (the server's clock, as in event ids) to the first task
    (of ``job``, if given) that finished after it."""
    finished = [
        int(eid.split("-")[0])
        for eid, ev in farm.ledger.events(after=f"{since_ms}-0", count=10**6)
        if ev.get("type") == "task-finished" and job in (None, ev.get("job"))
    ]
    assert finished, "no task finished after the outage"
    return (min(finished) - since_ms) / 1000


def jobs_under_way(farm: Cluster, prompt: str, seed: int, count: int = 32) -> list[str]:
    """A job of ``count`` images for each model, once each has 8 done (both workers busy)."""
    base = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler", "cfg_scale": 4.0}
    jobs = [
        farm.ledger.create(
            JobSpec(**base, model=m, prompt=prompt, seed=seed, count=count, batch_size=4)
        ).id
        for m in MODELS
    ]
    wait_for(lambda: all(farm.ledger.get(j).done >= 8 for j in jobs), 180, "both jobs under way")
    return jobs


def claimed(farm: Cluster, least: int = 2) -> dict[str, list[tuple[str, int]]]:
    """The claimed tasks once at least ``least`` are claimed and not finished (read in
    one go: a task may finish between a count and a second read)."""
    seen: list[dict[str, list[tuple[str, int]]]] = []

    def enough() -> bool:
        seen.append(farm.ledger.running())
        return sum(len(t) for t in seen[-1].values()) >= least

    wait_for(enough, 60, f"{least} claims")
    return seen[-1]


def check_every_image_once(farm: Cluster, jobs: list[str]) -> None:
    """Each job done with every image once and none failed, its PNGs all stored, no claim
    left behind and no model blamed."""
    for j in jobs:
        job = farm.wait(j, timeout=240)
        n = job.total
        assert (job.state, job.done, job.failed) == ("done", n, 0), job.summary()
        # every image once: the done bitmap has each index, and its count is the counter
        assert farm.ledger.done_indices(j, 0, 100) == list(range(n))
        assert job.summary()["tasks_finished"] == job.plan.n_tasks
        keys = farm.s3.list_objects_v2(Bucket=farm.bucket, Prefix=f"out/renders/{j}/")
        assert keys["KeyCount"] == n
    assert farm.ledger.running() == {}
    # an outage counts against no model
    assert farm.assignments_blocked() == {}
    assert not list(farm.r.scan_iter(f"{farm.config.namespace}:fail:*"))


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    tmp = tmp_path_factory.mktemp("restart")
    models = tiny_models(tmp, MODELS)
    env = {"FARM_MIN_DWELL_S": "2", "FARM_LEADER_TTL": "3", "FARM_WORKER_TTL": str(TTL_S)}
    with Cluster(tmp, workers=2, models=models, schedulers=2, env=env, redis_args=PERSIST) as c:
        yield c


@pytest.mark.parametrize(
    "down_s",
    [
        pytest.param(2.0, id="shorter-than-heartbeat-ttl"),  # the workers still look alive
        pytest.param(9.0, id="longer-than-heartbeat-ttl"),  # every worker looks dead at first
    ],
)
def test_a_redis_crash_mid_job_loses_nothing(farm: Cluster, down_s: float) -> None:
    jobs = jobs_under_way(farm, "a shape", 7)
    in_flight = claimed(farm)  # tasks claimed but not finished
    done_before = sum(farm.ledger.get(j).done for j in jobs)
    farm.redis_server.restart(down_s=down_s)
    back_ms = int(farm.ledger.r.time()[0] * 1000)  # the server's clock, as in event ids

    # what was rendering when Redis died was finished too (no claim is left behind)
    check_every_image_once(farm, jobs)
    assert sum(len(t) for t in in_flight.values()) >= 2 and done_before < 64
    # nothing died: both schedulers, the worker launcher, and both workers are back
    assert all(p.poll() is None for p in farm.procs)
    wait_for(lambda: len(farm.inventories()) == 2, 30, "both workers heartbeating again")

    recovery_s = recovery_after(farm, back_ms)
    print(f"\nRedis down {down_s:.0f} s (SIGKILL): first task finished {recovery_s:.1f} s later")
    # far below the broker's visibility timeout (1 h) and the scheduler's resend_after (10 min)
    assert recovery_s < 30


@pytest.fixture(scope="module")
def proxied_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """As ``farm``, with every part reaching Redis through a proxy, and a 2 s limit on
    each Redis call (FARM_REDIS_TIMEOUT)."""
    tmp = tmp_path_factory.mktemp("failover")
    env = {
        "FARM_MIN_DWELL_S": "2",
        "FARM_LEADER_TTL": "3",
        "FARM_WORKER_TTL": str(TTL_S),
        "FARM_REDIS_TIMEOUT": "2",
    }
    with Cluster(
        tmp,
        workers=2,
        models=tiny_models(tmp, MODELS),
        schedulers=2,
        env=env,
        redis_args=PERSIST,
        redis_proxy=True,
    ) as cluster:
        yield cluster


def test_a_failover_to_a_copy_behind_the_same_address_loses_nothing(
    proxied_farm: Cluster,
) -> None:
    farm = proxied_farm
    assert farm.proxy is not None
    jobs = jobs_under_way(farm, "a failover", 3)
    wait_for(lambda: len(farm.ledger.r.hgetall(farm.ledger.running_key)) >= 2, 60, "2 claims")
    old = farm.redis_server
    old.freeze()  # silent: every connection to it stays open and unanswered
    new = RedisServer(extra_args=PERSIST, data_from=old.dir).__enter__()  # its replica
    farm.proxy.switch(new.port)  # the address now leads to the replica; old paths hang
    farm.redis_server = new  # stopped with the farm
    switched_ms = int(redis.Redis.from_url(new.url).time()[0] * 1000)
    old.crash()
    old.stop()

    check_every_image_once(farm, jobs)
    assert all(p.poll() is None for p in farm.procs)
    wait_for(lambda: len(farm.inventories()) == 2, 30, "both workers heartbeating again")
    # each job renders on a worker of its own: both workers carried on
    recovery_s = max(recovery_after(farm, switched_ms, j) for j in jobs)
    print(f"\nfailover, old connections left hanging: both jobs on again {recovery_s:.1f} s later")
    # Redis calls give up after 2 s, and a consumer's BRPOP is dropped after 1 + 2 x 2 s
    assert recovery_s < 30


STORAGE_DOWN_S = 20.0  # longer than boto3's own retries of one request (at most 15 s)


def test_storage_away_longer_than_boto3_retries_fails_no_image(farm: Cluster) -> None:
    jobs = jobs_under_way(farm, "a store away", 11)
    farm.moto.stop_serving()  # connections refused; moto keeps the objects
    down = time.monotonic()
    log_before = len(farm.worker_log())
    wait_for(
        lambda: "storage unavailable" in farm.worker_log()[log_before:], 30, "a worker waiting"
    )
    time.sleep(max(0.0, STORAGE_DOWN_S - (time.monotonic() - down)))
    done_while_away = sum(farm.ledger.get(j).done for j in jobs)
    farm.moto.serve_again()
    back_ms = int(farm.ledger.r.time()[0] * 1000)

    check_every_image_once(farm, jobs)
    assert done_while_away < 64  # the outage held images back
    recovery_s = recovery_after(farm, back_ms)
    print(f"\nS3 away {STORAGE_DOWN_S:.0f} s: first task finished {recovery_s:.1f} s after")
    assert recovery_s < 30  # the waits between tries are at most 10 s


class Consumer:
    """Celery's worker consumer, as far as a worker's runtime uses it: the model queues it
    consumes, and callbacks that its own loop runs later. Like Celery's event loop, which
    keeps them in a set, it runs them in no particular order (here: newest first)."""

    def __init__(self) -> None:
        self.task_consumer = SimpleNamespace(queues=[])
        self.pending: list[Callable[[], object]] = []

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.pending.append(lambda: fn(*args))

    def run_pending(self) -> None:
        while self.pending:
            self.pending.pop()()

    def add_task_queue(self, queue: str, *_: object) -> None:
        self.task_consumer.queues.append(SimpleNamespace(name=queue))

    def cancel_task_queue(self, queue: str) -> None:
        self.task_consumer.queues = [q for q in self.task_consumer.queues if q.name != queue]

    @property
    def queues(self) -> list[str]:
        return sorted(q.name for q in self.task_consumer.queues)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[Any, RedisServer, redis.Redis]]:
    """A worker runtime on its own Redis server (with an append-only file), models m0, m1."""
    from workers.runtime import Runtime

    with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        cfg = Config(
            data_dir=str(tmp_path),
            redis_url=server.url,
            namespace="t" + uuid.uuid4().hex[:6],
            storage_url="file://" + str(tmp_path / "store"),
            model_cache=str(tmp_path / "cache"),
        )
        r = redis.Redis.from_url(server.url)
        for name in ("m0", "m1"):
            ModelRegistry(r, cfg.namespace).add(ModelEntry(name=name, engine="synthetic"))
        rt = Runtime(cfg, name="w0")
        yield rt, server, r
        rt.shutdown()


def test_a_model_switch_cut_off_by_redis_blames_no_model_and_is_tried_again(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    rt, server, r = runtime
    ns, consumer = rt.config.namespace, Consumer()
    server.crash()
    with pytest.raises(redis.RedisError):
        rt._switch(consumer, "m0")  # the model's entry cannot be read
    consumer.run_pending()
    # not switched: the assignment watcher tries again, as it does while model != assigned
    assert rt.assigned is None and consumer.queues == []
    server.start_again()
    rt._switch(consumer, "m0")
    consumer.run_pending()
    assert rt.assigned == "m0" and rt.engine_model is not None
    assert consumer.queues == [model_queue(ns, "m0")]
    # the outage was counted against no model
    assert Assignments(r, ns).blocked() == {}
    assert not list(r.scan_iter(f"{ns}:fail:*"))


def test_a_model_switch_with_the_store_away_is_tried_again_blaming_no_model_for_a_while(
    runtime: tuple[Any, RedisServer, redis.Redis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.s3 import S3Store
    from tests.servers import MotoServer

    rt, _, r = runtime
    ns, consumer = rt.config.namespace, Consumer()
    ckpt = tiny_models(tmp_path, ("m2",))["m2"]
    with MotoServer() as s3:
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        rt.model_store.store = S3Store("models-" + uuid.uuid4().hex[:8], create_bucket=True)
        blob = rt.model_store.add(ckpt)
        ModelRegistry(r, ns).add(
            ModelEntry(name="m2", engine="sd1", sha256=blob.sha256, size=blob.size, key=blob.key)
        )
        s3.stop_serving()  # connections refused
        with pytest.raises(StorageError) as info:
            rt._switch(consumer, "m2")
        assert info.value.transient
        consumer.run_pending()
        assert rt.assigned is None and consumer.queues == []  # the watcher tries again
        assert not list(r.scan_iter(f"{ns}:fail:*"))
        # a store this worker cannot reach for longer than FARM_STORAGE_WAIT counts as any
        # load failure does, so that the model goes to workers that can load it
        rt.config = replace(rt.config, storage_wait=0.5)
        time.sleep(0.6)
        rt._switch(consumer, "m2")
        assert [k.decode() for k in r.scan_iter(f"{ns}:fail:*")] == [f"{ns}:fail:w0|m2"]
        assert rt.assigned == "m2" and rt.engine_model is None
        s3.serve_again()
        rt._switch(consumer, "m2")
        consumer.run_pending()
        assert rt.assigned == "m2" and rt.engine_model is not None
        assert consumer.queues == [model_queue(ns, "m2")]


def test_switches_whose_callbacks_run_late_and_out_of_order_end_on_the_last_model(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    rt, _, _ = runtime
    ns, consumer = rt.config.namespace, Consumer()
    rt._switch(consumer, "m0")
    consumer.run_pending()
    # while the consumer's loop is held up (a broker reconnect), the assignment goes away
    # and comes back, then moves on and back again: only the last one counts
    for model in (None, "m0", "m1", "m0"):
        rt._switch(consumer, model)
    consumer.run_pending()
    assert consumer.queues == [model_queue(ns, "m0")]
    rt._switch(consumer, None)
    rt._switch(consumer, "m1")
    consumer.run_pending()
    assert consumer.queues == [model_queue(ns, "m1")]


def test_the_watcher_sets_right_a_consumer_that_lost_its_queue(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    rt, _, r = runtime
    ns, consumer = rt.config.namespace, Consumer()
    Assignments(r, ns).set("w0", "m1", time.time(), rt.instance)
    rt.watch_assignment(consumer, interval=0.05)
    want = [model_queue(ns, "m1")]

    def settled() -> bool:
        consumer.run_pending()
        return consumer.queues == want

    wait_for(settled, 10, "the assigned model's queue consumed")
    consumer.task_consumer.queues = []  # a reconnect that dropped what a callback did
    wait_for(settled, 15, "the queue consumed again")


def test_a_call_to_a_redis_that_went_silent_gives_up_after_the_timeout(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    from farm.celery_app import make_app
    from farm.redis_client import connect

    rt, server, _ = runtime
    cfg = replace(rt.config, redis_timeout=1.0)
    client = connect(cfg)
    assert client.ping()
    transport = make_app(cfg).conf.broker_transport_options
    assert (transport["socket_timeout"], transport["health_check_interval"]) == (1.0, 1)
    server.freeze()  # the connection stays open; nothing answers
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert 0.9 < time.monotonic() - t0 < 3
    finally:
        server.thaw()
    assert client.ping()  # a new connection once it answers again
    with pytest.raises(ValueError, match="FARM_REDIS_TIMEOUT"):
        connect(replace(cfg, redis_timeout=0.0))


def test_waiting_for_redis_ends_when_it_answers_or_the_worker_stops(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    rt, server, _ = runtime
    assert rt.wait_for_redis(5.0)
    server.crash()
    t0 = time.monotonic()
    assert not rt.wait_for_redis(1.0)  # gives up after its limit
    assert 0.9 < time.monotonic() - t0 < 4
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(rt.wait_for_redis(60.0)))
    waiter.start()
    time.sleep(0.3)
    server.start_again()
    waiter.join(10)
    assert results == [True]  # Redis answered again
    server.crash()
    waiter = threading.Thread(target=lambda: results.append(rt.wait_for_redis(60.0)))
    waiter.start()
    time.sleep(0.3)
    rt.stopping.set()  # the worker begins to shut down (Celery's worker_shutting_down)
    waiter.join(10)
    assert results == [True, False]
    server.start_again()


def test_storage_that_takes_no_images_fails_them_and_blames_no_model(
    runtime: tuple[Any, RedisServer, redis.Redis], tmp_path: Path
) -> None:
    from workers.render import run_render

    rt, _, r = runtime
    ns = rt.config.namespace
    spec = {"prompt": "x", "count": 4, "batch_size": 4, "width": 64, "height": 64, "steps": 2}
    Assignments(r, ns).set("w0", "m0", time.time(), rt.instance)
    root = tmp_path / "out"
    rt.store = LocalStore(root)
    shutil.rmtree(root)
    root.write_text("")  # where the images would go is a file now: every write fails
    job = rt.ledger.create(JobSpec(model="m0", **spec)).id
    assert rt.ledger.release(job, 1) == [0]
    with pytest.raises(StorageError):
        run_render(rt, RenderMessage(namespace=ns, job_id=job, task_no=0))
    got = rt.ledger.get(job)
    assert (got.done, got.failed, got.tasks_finished) == (0, 4, 1)  # failed, to retry
    assert rt.ledger.running() == {}
    assert not list(r.scan_iter(f"{ns}:fail:*"))
    # the job says why: which stage, which worker and model, the storage error's text
    (error,) = rt.ledger.errors(job)
    assert (error["stage"], error["worker"], error["model"]) == ("store", "w0", "m0")
    assert (error["task"], error["images"], error["images_failed"]) == (0, [0, 1, 2, 3], True)
    assert error["error"].startswith("StorageError: ") and "renders/" in error["error"]
    # a model whose checkpoint the store lacks is the model's fault: that one counts
    ModelRegistry(r, ns).add(ModelEntry(name="gone", engine="sd1", sha256="0" * 64, size=1))
    Assignments(r, ns).set("w0", "gone", time.time(), rt.instance)
    rt.store = rt.model_store.store = LocalStore(tmp_path / "empty")
    job = rt.ledger.create(JobSpec(model="gone", **spec)).id
    assert rt.ledger.release(job, 1) == [0]
    with pytest.raises(StorageError):
        run_render(rt, RenderMessage(namespace=ns, job_id=job, task_no=0))
    assert rt.ledger.get(job).failed == 4
    assert [k.decode() for k in r.scan_iter(f"{ns}:fail:*")] == [f"{ns}:fail:w0|gone"]
    (error,) = rt.ledger.errors(job)
    assert (error["stage"], error["model"]) == ("load", "gone")
    assert error["error"].startswith("ObjectNotFound: ") and "0" * 64 in error["error"]


def test_a_hang_is_told_to_the_jobs_it_holds_up(
    runtime: tuple[Any, RedisServer, redis.Redis],
) -> None:
    from workers.watchdog import Stall

    rt, _, _ = runtime
    spec = {"prompt": "x", "count": 4, "batch_size": 2, "width": 64, "height": 64, "steps": 2}
    led = rt.ledger
    job, other = (led.create(JobSpec(model=m, **spec)).id for m in ("m0", "m1"))
    waiting = led.create(JobSpec(model="m1", sweep={"model": ["m1", "m0"]}, **spec)).id
    paused = led.create(JobSpec(model="m0", **spec)).id
    assert led.pause(paused) == "ok"
    # the task's own thread hung, in the render of task 1: that task's job is told
    rt.current_task, rt.task_thread = f"{job}/1", threading.get_ident()
    rt._record_stall(Stall("rendering task x", "m0", 301.4, threading.get_ident()))
    (error,) = led.errors(job)
    assert (error["task"], error["images"], error["stage"]) == (1, [2, 3], "hang")
    assert error["error"].startswith("no progress for 301 s while rendering task x")
    assert not error["images_failed"] and error["model"] == "m0"
    # another thread hung loading m0 ahead of its tasks: the unfinished jobs rendering
    # with m0 are told, with no task; those with other models only, or paused, are not
    rt._record_stall(Stall("loading model m0", "m0", 300.0, threading.get_ident() + 1))
    assert [e["task"] for e in led.errors(job)] == [None, 1]
    assert [e["task"] for e in led.errors(waiting)] == [None]
    assert led.errors(other) == [] and led.errors(paused) == []
    assert "while loading model m0" in led.errors(waiting)[0]["error"]


def test_a_worker_that_stops_while_storage_is_away_leaves_its_task_to_another(
    runtime: tuple[Any, RedisServer, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.s3 import S3Store
    from tests.servers import free_port
    from workers.render import StoreAway, run_render

    rt, _, r = runtime
    ns = rt.config.namespace
    Assignments(r, ns).set("w0", "m0", time.time(), rt.instance)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    rt.store = S3Store("away", endpoint_url=f"http://127.0.0.1:{free_port()}")  # refused
    spec = {"prompt": "x", "count": 4, "batch_size": 4, "width": 64, "height": 64, "steps": 2}
    job = rt.ledger.create(JobSpec(model="m0", **spec)).id
    assert rt.ledger.release(job, 1) == [0]
    raised: list[BaseException] = []

    def render() -> None:
        try:
            run_render(rt, RenderMessage(namespace=ns, job_id=job, task_no=0))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)

    worker = threading.Thread(target=render)
    worker.start()
    wait_for(lambda: rt.ledger.running(), 10, "the task claimed")
    time.sleep(1.0)  # rendered, and trying to store
    assert worker.is_alive()  # still waiting for the store (FARM_STORAGE_WAIT: 300 s)
    rt.stopping.set()  # the worker begins to shut down
    worker.join(30)
    assert [type(e) for e in raised] == [StoreAway]
    got = rt.ledger.get(job)
    # neither done nor failed, and still claimed: the scheduler hands it on once this
    # worker's heartbeat is gone, as it does a dead worker's
    assert (got.done, got.failed, got.tasks_finished) == (0, 0, 0)
    assert rt.ledger.running() == {rt.instance: [(job, 0)]}
    assert not list(r.scan_iter(f"{ns}:fail:*"))
