"""Celery application settings shared by the producer side and the workers.

The producer (scheduler) only sends tasks by name, so it never imports the workers'
code (torch, diffusers). See FACTS/DESIGN for why each setting is what it is.
"""

from __future__ import annotations

from celery import Celery
from pydantic import BaseModel, ConfigDict

from farm.config import Config
from farm.redis_client import connection_limits

RENDER_TASK = "farm.render"


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
        "priority_steps": list(range(10)),
        "sep": ":",
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
