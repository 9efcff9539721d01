"""A task that its workers die of, against a real Redis server and broker: the scheduler
sends it to another worker until FARM_TASK_LOSSES worker processes have died holding it,
then fails its images, so one bad task cannot take down the farm worker by worker. A
retry of the failed images gives the task a fresh count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import redis

from farm.celery_app import make_app, model_queue
from farm.config import Config
from farm.jobs import Ledger
from scheduler.service import Scheduler
from tests.api.test_scheduler_outage import queued

Submit = Callable[..., dict[str, Any]]


def lost_in(sched: Scheduler, job: str, task: int, instance: str) -> dict[str, str]:
    """The worker process ``instance`` claimed the task and died; the scheduler's recovery
    runs (no worker is alive). The events it wrote."""
    led = sched.ledger
    assert led.claim(job, task, instance.split("#")[0], instance) == "ok"
    mark = led.r.xrevrange(led.events_key, count=1)[0][0].decode()
    sched.recover(led.running(), [])
    assert led.running() == {}  # the claim is dropped either way
    return {f["type"]: f for _, f in led.events(after=mark)}


def drain(config: Config) -> None:
    queue = model_queue(config.namespace, "synthetic")
    with make_app(config).connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def test_a_task_whose_workers_keep_dying_fails_its_images_after_the_limit(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    config = replace(config, task_losses=3)
    sched = Scheduler(config, redis_client)
    led: Ledger = sched.ledger
    job = submit(count=8, batch_size=2)["id"]  # tasks 0..3, task 1 is images 2 and 3

    for n, instance in enumerate(("w0#a", "w1#b"), start=1):
        got = lost_in(sched, job, 1, instance)
        assert got["task-recovered"]["losses"] == str(n) and "task-failed" not in got
        assert queued(config, "synthetic") == n  # sent again each time
    # the same death seen twice (a round whose send failed keeps the claim) counts once
    assert led.lose_task(job, 1, "w1#b") == (2, False)
    led.mark(job, [2])  # the last worker stored one of the two images before it died
    got = lost_in(sched, job, 1, "w2#c")
    assert "task-recovered" not in got and queued(config, "synthetic") == 2  # not sent
    failed = got["task-failed"]
    assert (failed["task"], failed["losses"], failed["dead"]) == ("1", "3", "w2#c")
    assert "3 worker processes died holding it" in failed["reason"]
    rec = led.get(job)
    assert (rec.done, rec.failed, rec.tasks_finished) == (1, 1, 1)  # image 3 failed
    assert led.claim(job, 1, "w3", "w3#d") == "ok" and not led.finish_task(job, 1)
    # the job's failure list says what happened to task 1, once per death, newest first
    errors = led.errors(job)
    assert [(e["task"], e["stage"], e["worker"], e["images_failed"]) for e in errors] == [
        (1, "lost", "w2", True), (1, "lost", "w1", False), (1, "lost", "w0", False)
    ]  # fmt: skip
    assert all(e["images"] == [2, 3] and e["model"] == "synthetic" for e in errors)
    assert errors[0]["error"] == (
        "worker process w2#c died or hung holding the task (3 of FARM_TASK_LOSSES=3); "
        "its images fail"
    )
    assert "(1 of FARM_TASK_LOSSES=3); the task goes to another worker" in errors[2]["error"]
    assert rec.errors == 3

    # another task of the job is not touched by task 1's count
    assert lost_in(sched, job, 2, "w0#e")["task-recovered"]["losses"] == "1"

    # the rest renders; the job ends failed; a retry gives task 1 a fresh count
    led.mark(job, [0, 1, 4, 5, 6, 7])
    assert led.get(job).state == "failed"
    assert led.retry_failed(job) == ("running", 1)
    drain(config)
    got = lost_in(sched, job, 1, "w1#f")
    assert got["task-recovered"]["losses"] == "1" and queued(config, "synthetic") == 1


def test_a_limit_below_one_is_refused(redis_client: redis.Redis, config: Config) -> None:
    with pytest.raises(ValueError, match="FARM_TASK_LOSSES=0"):
        Scheduler(replace(config, task_losses=0), redis_client)
