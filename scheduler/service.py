"""The scheduler loop: meters tasks of runnable jobs into the broker.

It keeps the broker queue shallow (``capacity`` tasks released and unfinished at once)
so that priorities and cancel act within one task's time, never pushing a whole big job
at once. Jobs close themselves in the ledger when their last image is done or failed.
"""

from __future__ import annotations

import logging
import threading

import redis

from farm.celery_app import RENDER_TASK, RenderMessage, celery_priority, make_app, render_queue
from farm.config import Config
from farm.jobs import Ledger
from farm.workers_registry import WorkerRegistry
from scheduler.policy import JobView, capacity, plan_releases

log = logging.getLogger("farm.scheduler")


class Scheduler:
    def __init__(self, config: Config, client: redis.Redis | None = None):
        self.config = config
        self.r = client or redis.Redis.from_url(config.redis())
        self.ledger = Ledger(self.r, config.namespace)
        self.workers = WorkerRegistry(self.r, config.namespace)
        self.app = make_app(config)
        self.stop_event = threading.Event()
        self.released = 0

    def tick(self) -> int:
        """One round: read state, decide, release. Returns the number of tasks sent."""
        jobs = [j for j in self.ledger.active() if j.state in ("queued", "running")]
        views = [
            JobView(
                id=j.id,
                priority=j.spec.priority,
                created_at=j.created_at,
                outstanding=j.outstanding,
                remaining=j.n_tasks - j.tasks_released,
            )
            for j in jobs
        ]
        cap = capacity(len(self.workers.live()), self.config.queue_depth)
        by_id = {j.id: j for j in jobs}
        sent = 0
        for job_id, n in plan_releases(views, cap):
            job = by_id[job_id]
            for task_no in self.ledger.release(job_id, n):
                msg = RenderMessage(namespace=self.config.namespace, job_id=job_id, task_no=task_no)
                self.app.send_task(
                    RENDER_TASK,
                    kwargs=msg.model_dump(),
                    queue=render_queue(self.config.namespace, job.spec.model),
                    priority=celery_priority(job.spec.priority),
                )
                sent += 1
        self.released += sent
        return sent

    def run(self) -> None:
        log.info(
            "scheduler running on %s (namespace %s)", self.config.redis(), self.config.namespace
        )
        while not self.stop_event.is_set():
            try:
                self.tick()
                # sleep until a task finishes or a job arrives, at most one interval
                self.ledger.wait_wake(self.config.scheduler_interval)
            except redis.ConnectionError as exc:
                log.warning("redis unavailable: %s", exc)
                self.stop_event.wait(1.0)

    def stop(self) -> None:
        self.stop_event.set()
