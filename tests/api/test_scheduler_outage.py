"""The scheduler when the broker does not answer, against a real Redis server: tasks the
ledger released but the broker did not take go out at the next round, not after
``resend_after``, and a worker that is gone keeps its claims until their tasks are sent.
The same for tasks released by a call whose answer Redis never delivered."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import kombu.exceptions
import pytest
import redis

from farm.celery_app import make_app, model_queue
from farm.config import Config
from scheduler.service import Scheduler
from tests.servers import free_port

Submit = Callable[..., dict[str, Any]]


def queued(config: Config, model: str) -> int:
    """Messages waiting in a model's broker queue (all priorities)."""
    with make_app(config).connection_for_write() as conn:
        q = model_queue(config.namespace, model)
        return int(conn.default_channel.queue_declare(q, passive=True).message_count)


def broker_away(config: Config) -> Any:
    """A Celery app whose broker is a port nothing listens on (the ledger still answers)."""
    return make_app(replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def released_while_the_broker_is_away(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> tuple[Scheduler, str]:
    """A leading scheduler whose first round released tasks the broker did not take."""
    sched = Scheduler(config, redis_client)
    job = submit(count=16, batch_size=2)["id"]
    sched.app = broker_away(config)
    with pytest.raises(kombu.exceptions.OperationalError):
        sched.tick()
    assert sched.leader and sched.unsent
    return sched, job


def test_tasks_released_while_the_broker_is_away_go_out_at_the_next_round(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched, job = released_while_the_broker_is_away(submit, redis_client, config)
    pending = sorted(
        int(t) for t in redis_client.zrange(sched.ledger.job_key(job, "pending"), 0, -1)
    )
    assert pending, "the ledger released tasks"
    assert sorted(task for _, task, _, _ in sched.unsent) == pending
    with pytest.raises(kombu.exceptions.OperationalError):
        sched.tick()  # still away: kept, not released twice
    assert sorted(task for _, task, _, _ in sched.unsent) == pending
    sched.app = make_app(config)
    sched.tick()  # back: sent at once, and no more released (the queue is full)
    assert sched.unsent == [] and sched.recovered == 0
    assert queued(config, "synthetic") == len(pending)


def test_unsent_tasks_of_a_scheduler_that_loses_the_lead_go_out_from_the_new_leader(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched, job = released_while_the_broker_is_away(submit, redis_client, config)
    sent = len(sched.unsent)
    sched.lease.release()
    redis_client.set(sched.lease.key, "another scheduler")
    sched.tick()
    assert not sched.leader and sched.unsent == []  # not its to send any more
    redis_client.delete(sched.lease.key)
    other = Scheduler(config, redis_client)
    other.tick()  # a new leader sends every task released and not claimed
    assert other.leader and other.recovered == sent
    assert queued(config, "synthetic") == sent
    assert len(redis_client.zrange(other.ledger.job_key(job, "pending"), 0, -1)) == sent


def test_a_dead_workers_claim_stays_until_its_task_is_sent(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched = Scheduler(config, redis_client)
    job = submit(count=4, batch_size=2)["id"]
    assert sched.ledger.release(job, 1) == [0]
    assert sched.ledger.claim(job, 0, "gone", "gone#1") == "ok"  # no inventory: it is dead
    sched.app = broker_away(config)
    with pytest.raises(kombu.exceptions.OperationalError):
        sched.tick()
    assert sched.ledger.running() == {"gone#1": [(job, 0)]}
    sched.app = make_app(config)
    sched.tick()
    assert sched.ledger.running() == {} and sched.recovered == 1
    # the claim of another worker on the same task is not the dead one's to drop
    assert sched.ledger.claim(job, 0, "new", "new#1") == "ok"
    assert not sched.ledger.forget_running(job, 0, "gone#1")
    assert sched.ledger.running() == {"new#1": [(job, 0)]}


def test_tasks_released_by_a_call_whose_answer_was_lost_go_out_at_the_next_round(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    sched = Scheduler(config, redis_client)
    job = submit(count=16, batch_size=2)["id"]
    release = sched.ledger._release

    def answer_lost(*args: Any, **kwargs: Any) -> Any:
        release(*args, **kwargs)  # runs on the server...
        raise redis.TimeoutError("Timeout reading from socket")  # ...its answer never comes

    sched.ledger._release = answer_lost
    with pytest.raises(redis.TimeoutError):
        sched.tick()
    pending = redis_client.zrange(sched.ledger.job_key(job, "pending"), 0, -1)
    # released in the ledger, and none of them known to the scheduler, so none sent
    assert pending and sched.unsent == [] and sched.released == 0
    sched.ledger._release = release
    sched.tick()  # every task released and not claimed goes out, not after resend_after
    assert sched.recovered == len(pending)
    assert queued(config, "synthetic") >= len(pending)
    sched.tick()
    assert sched.recovered == len(pending)  # once: the next round is a plain one
