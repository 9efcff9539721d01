"""Celery side of a worker process: the ``farm.render`` task and the heartbeat thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

import kombu.exceptions
from celery import signals

from farm.celery_app import RENDER_TASK, RenderMessage, make_app
from farm.config import load
from workers.render import StoreAway, run_render
from workers.runtime import REDIS_AWAY, Runtime

log = logging.getLogger("farm.worker")
config = load()
app = make_app(config)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime(name: str | None = None) -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(config, name)
        return _runtime


@app.task(name=RENDER_TASK, bind=True)
def render(self: Any, **kwargs: Any) -> dict[str, Any]:
    msg = RenderMessage.model_validate(kwargs)
    if msg.namespace != config.namespace:
        raise ValueError(
            f"task for namespace {msg.namespace!r}, worker serves {config.namespace!r}"
        )
    rt = runtime(self.request.hostname)
    attempt = 0
    while True:
        try:
            return run_render(rt, msg, again=attempt > 0)
        except (*REDIS_AWAY, kombu.exceptions.OperationalError) as exc:
            # Redis (ledger and broker) is away: nothing of this task can be recorded or
            # handed on, so it runs again once Redis is back (a run is idempotent). Past the
            # visibility timeout the broker hands the message out again anyway.
            log.warning("task %s/%s: redis unavailable (%s)", msg.job_id, msg.task_no, exc)
            settle = min(5.0, 0.25 * 2**attempt)  # a Redis that answers but refuses writes
            if not rt.wait_for_redis(config.visibility_timeout, settle):
                raise
            attempt += 1
        except StoreAway as exc:
            # claimed and unfinished: the scheduler hands it on once this worker is gone
            log.warning("task %s/%s left to another worker: %s", msg.job_id, msg.task_no, exc)
            return {"job": msg.job_id, "task": msg.task_no, "left": str(exc)}
        except Exception as exc:
            # the images are marked failed in the ledger; do not let Celery redeliver forever
            return {
                "job": msg.job_id,
                "task": msg.task_no,
                "error": f"{type(exc).__name__}: {exc}",
            }


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    rt = runtime(getattr(sender, "hostname", None))
    rt.start_heartbeat()
    rt.start_watchdog()
    if sender is not None:
        rt.watch_assignment(sender)
    log.info("worker %s ready on %s", rt.name, rt.device)


@signals.worker_shutting_down.connect
def _on_shutting_down(**_: Any) -> None:
    # a task waiting for Redis stops waiting; the broker hands its message out again
    if _runtime is not None:
        _runtime.stopping.set()


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _runtime is not None:
        _runtime.shutdown()
