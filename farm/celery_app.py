"""Celery application settings shared by the producer side and the workers.

The producer (scheduler) only sends tasks by name, so it never imports the workers'
code (torch, diffusers). See FACTS/DESIGN for why each setting is what it is.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

import redis
from celery import Celery
from pydantic import BaseModel, ConfigDict

from farm.config import Config
from farm.redis_client import connection_limits

RENDER_TASK = "farm.render"
PRIORITY_STEPS = tuple(range(10))  # one Redis list per Celery priority (see make_app)
QUEUE_SEP = ":"
UNACKED_KEY = "unacked"  # kombu's hash of the messages delivered to a consumer, not acked


class RenderMessage(BaseModel):
    """Payload of one ``farm.render`` task: a contiguous image range of one job."""

    model_config = ConfigDict(extra="forbid")

    namespace: str
    job_id: str
    task_no: int


def model_queue(namespace: str, model: str) -> str:
    """The broker queue of one model: workers assigned to the model consume it."""
    return f"{namespace}.m.{model}"


def worker_queue(namespace: str, worker: str) -> str:
    """A worker's own queue: every worker consumes it from its start."""
    return f"{namespace}.w.{worker}"


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step (kombu names
    the one of priority 0 after the queue itself)."""
    return [queue if p == 0 else f"{queue}{QUEUE_SEP}{p}" for p in PRIORITY_STEPS]


def held_tasks(client: redis.Redis, namespace: str, models: Iterable[str]) -> set[tuple[str, int]]:
    """(job id, task number) of every render message the broker holds for ``models``:
    waiting in their queues, or delivered to a worker and not acked yet. One round trip.

    A message is in neither while a worker moves it from the queue to the unacked hash
    (kombu does that in two steps, the second from the worker): a worker cut off from
    Redis between the two has lost it."""
    pipe = client.pipeline(transaction=False)
    for model in models:
        for key in queue_lists(model_queue(namespace, model)):
            pipe.lrange(key, 0, -1)
    pipe.hvals(UNACKED_KEY)
    *queued, unacked = pipe.execute()
    raws = [raw for got in queued for raw in got]
    for item in unacked:
        try:
            raws.append(json.loads(item)[0])  # [message, exchange, routing key]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
    out = set()
    for raw in raws:
        msg = _render_message(raw)
        if msg is not None and msg.namespace == namespace:
            out.add((msg.job_id, msg.task_no))
    return out


def _render_message(raw: object) -> RenderMessage | None:
    """The payload of a kombu message (as stored in Redis) if it is a ``farm.render`` task
    of Celery's message protocol 2, else None."""
    try:
        message = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        if message["headers"].get("task") != RENDER_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return RenderMessage.model_validate(kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        return None


def celery_priority(priority: int) -> int:
    """Job priority 0-100 (100 most urgent) -> Celery priority on Redis (0 most urgent)."""
    return 9 - round(max(0, min(100, priority)) * 9 / 100)


def send_render(app: Celery, msg: RenderMessage, model: str, priority: int) -> None:
    """Put a render task on ``model``'s queue at job priority ``priority`` (0-100)."""
    app.send_task(
        RENDER_TASK,
        kwargs=msg.model_dump(),
        queue=model_queue(msg.namespace, model),
        priority=celery_priority(priority),
    )


def make_app(config: Config) -> Celery:
    app = Celery("farm", broker=config.redis(), set_as_current=False)
    vt = config.visibility_timeout
    transport = {
        "visibility_timeout": vt,
        "priority_steps": list(PRIORITY_STEPS),
        "sep": QUEUE_SEP,
        "queue_order_strategy": "priority",
        # restore tasks of dead workers soon after the visibility timeout
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        # a broker gone without closing its connections (see farm.redis_client): sends
        # and acks give up after redis_timeout, and a consumer whose BRPOP gets no answer
        # reconnects within about 1 + 2 x health_check_interval seconds
        **connection_limits(config),
        "health_check_interval": max(1, round(config.redis_timeout)),
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": vt},
        visibility_timeout=vt,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_default_queue=f"{config.namespace}.default",
        task_default_priority=celery_priority(50),
        broker_connection_retry_on_startup=True,
        worker_soft_shutdown_timeout=float(min(vt, 600)),
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        task_reject_on_worker_lost=True,
    )
    return app
