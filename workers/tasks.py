"""Celery side of a worker process: the ``farm.render`` task and the heartbeat thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import signals

from farm.celery_app import RENDER_TASK, RenderMessage, make_app
from farm.config import load
from workers.render import run_render
from workers.runtime import Runtime

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
    try:
        return run_render(runtime(self.request.hostname), msg)
    except Exception as exc:
        # the images are marked failed in the ledger; do not let Celery redeliver forever
        return {"job": msg.job_id, "task": msg.task_no, "error": f"{type(exc).__name__}: {exc}"}


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    rt = runtime(getattr(sender, "hostname", None))
    rt.start_heartbeat()
    if sender is not None:
        rt.watch_assignment(sender)
    log.info("worker %s ready on %s", rt.name, rt.device)


@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _runtime is not None:
        _runtime.shutdown()
