"""The scheduler loop: places models on workers and meters tasks into per-model queues.

Each round, on the leader only (a Redis lease elects one among replicas):

1. Recover: tasks claimed by a worker whose heartbeat expired go back to their model's
   queue at once, without waiting for the broker's visibility timeout (a duplicate run is
   harmless: the ledger counts an image once).
2. Place: from the workers' inventories and each model's backlog, the pure placement
   policy (``scheduler.placement.place``) says which model each worker serves; changes are
   written to Redis, where each worker picks up its own entry.
3. Release: per model queue, runnable jobs get free slots (``capacity`` tasks released and
   unfinished per holder) by priority, fair share among equals, and aging, so the broker
   queue stays shallow and priorities, pause and cancel act within one task.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import redis

from farm.celery_app import RENDER_TASK, RenderMessage, celery_priority, make_app, model_queue
from farm.config import Config
from farm.jobs import RUNNABLE, JobRecord, Ledger
from farm.workers_registry import Assignments, WorkerRegistry
from scheduler.placement import ModelDemand, PlacementParams, WorkerState, place
from scheduler.policy import JobView, capacity, plan_releases

log = logging.getLogger("farm.scheduler")

# KEYS: lease   ARGV: me, ttl_ms -> 1 if held by me (taken or renewed)
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Lease:
    """Leader election: one holder of ``<ns>:scheduler:leader`` at a time, renewed every
    round; when the leader dies the lease expires and another replica takes it."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: float):
        self.r = client
        self.key = f"{namespace}:scheduler:leader"
        self.me = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self._script = client.register_script(_LEASE)

    def hold(self) -> bool:
        return bool(self._script(keys=[self.key], args=[self.me, self.ttl_ms]))

    def release(self) -> None:
        if self.r.get(self.key) == self.me.encode():
            self.r.delete(self.key)


def next_model(job: JobRecord) -> str:
    """The model of the next task the job would release."""
    plan = job.plan
    task = min(job.cursor, plan.n_tasks - 1)
    return plan.cell_settings(plan.task(task).cell)["model"]


def effective_priority(job: JobRecord, now: float, aging_s: float) -> int:
    """Priority plus one step per ``aging_s`` the job has waited for a release."""
    waited = now - (job.last_release or job.created_at)
    return job.priority + (int(waited // aging_s) if aging_s > 0 else 0)


class Scheduler:
    def __init__(self, config: Config, client: redis.Redis | None = None):
        self.config = config
        self.r = client or redis.Redis.from_url(config.redis())
        self.ledger = Ledger(self.r, config.namespace)
        self.workers = WorkerRegistry(self.r, config.namespace)
        self.assignments = Assignments(self.r, config.namespace)
        self.lease = Lease(self.r, config.namespace, config.leader_ttl)
        self.app = make_app(config)
        self.params = PlacementParams(
            default_load_s=config.default_load_s, min_dwell_s=config.min_dwell_s
        )
        self.stop_event = threading.Event()
        self.released = 0
        self.recovered = 0
        self.leader = False

    # one round
    def tick(self, now: float | None = None) -> int:
        """One round if leader. Returns the number of tasks sent."""
        was_leader = self.leader
        self.leader = self.lease.hold()
        if not self.leader:
            return 0
        now = time.time() if now is None else now
        running = self.ledger.running()  # read before the inventories: see recover()
        inventories = self.workers.live()
        self.recover(running, inventories)
        jobs = [j for j in self.ledger.active() if j.state in RUNNABLE]
        # a new leader sends again every release not claimed yet: the one before may have
        # died between releasing a task and sending it (a duplicate is harmless)
        self.resend_stale(jobs, now, 0.0 if not was_leader else self.config.resend_after)
        holders = self.place(inventories, jobs, now)
        return self.release(jobs, holders, now)

    def resend_stale(self, jobs: list[JobRecord], now: float, older_than: float) -> None:
        """Send again the tasks released more than ``older_than`` seconds ago and never
        claimed (a scheduler that died between release and send, a message lost by the
        broker)."""
        for job in jobs:
            for task_no in self.ledger.stale_releases(job.id, older_than, now):
                model = job.plan.cell_settings(job.plan.task(task_no).cell)["model"]
                self._send(job, task_no, model)
                self.recovered += 1
                log.warning("task %s/%s was never claimed; sent again", job.id, task_no)

    def recover(self, running: dict[str, list[tuple[str, int]]], inventories: list[dict]) -> None:
        live = {w.get("instance", w["name"]) for w in inventories}
        for instance, tasks in running.items():
            if instance in live:
                continue
            for job_id, task_no in tasks:
                self.ledger.forget_running(job_id, task_no)
                try:
                    job = self.ledger.get(job_id)
                except KeyError:
                    continue
                if job.state not in RUNNABLE:
                    continue
                model = job.plan.cell_settings(job.plan.task(task_no).cell)["model"]
                self._send(job, task_no, model)
                self.recovered += 1
                self.r.xadd(
                    self.ledger.events_key,
                    {"type": "task-recovered", "job": job_id, "task": task_no,
                     "dead": instance},
                    maxlen=100_000,
                    approximate=True,
                )  # fmt: skip
                log.warning("worker %s is gone; task %s/%s sent again", instance, job_id, task_no)

    def demands(self, jobs: list[JobRecord], inventories: list[dict], now: float) -> list:
        per_image = _image_seconds(inventories)
        out = []
        for job in jobs:
            model = next_model(job)
            s = job.spec
            key = f"{model}:{s.width}x{s.height}:{s.steps}"
            secs = per_image.get(key, self.config.default_image_s)
            left = max(0, job.total - job.done - job.failed)
            out.append(
                ModelDemand(model, left * secs, effective_priority(job, now, self.config.aging_s),
                            job.created_at)
            )  # fmt: skip
        return out

    def place(self, inventories: list[dict], jobs: list[JobRecord], now: float) -> dict[str, int]:
        """Decide and publish assignments; returns the number of holders per model."""
        current = self.assignments.all()
        live = {w["name"] for w in inventories}
        for name in set(current) - live:  # a dead worker holds nothing
            self.assignments.remove(name)
            current.pop(name)
        blocked = self.assignments.blocked(now)
        mean_load = _mean_load(inventories)
        states = []
        for w in inventories:
            name = w["name"]
            model, at = current.get(name, (None, 0.0))
            models = w.get("models") or {}
            load_s = {**mean_load, **(w.get("load_seconds") or {})}
            states.append(
                WorkerState(
                    name=name,
                    model=model,
                    ram=frozenset(models.get("ram", [])),
                    disk=frozenset(models.get("disk", [])),
                    assigned_at=at,
                    blocked=frozenset(blocked.get(name, set())),
                    load_s=load_s,
                )
            )
        decision = place(states, self.demands(jobs, inventories, now), now, self.params)
        instances = {w["name"]: w.get("instance", "") for w in inventories}
        holders: dict[str, int] = defaultdict(int)
        for name, model in decision.items():
            if model != current.get(name, (None, 0.0))[0]:
                load = self.assignments.set(name, model, now, instances.get(name, ""))
                self.r.xadd(
                    self.ledger.events_key,
                    {"type": "assign", "worker": name, "model": model or "", "load": int(load)},
                    maxlen=100_000,
                    approximate=True,
                )
                log.info("worker %s -> model %s", name, model)
            if model:
                holders[model] += 1
        return holders

    def release(self, jobs: list[JobRecord], holders: dict[str, int], now: float) -> int:
        by_model: dict[str, list[JobRecord]] = defaultdict(list)
        for job in jobs:
            by_model[next_model(job)].append(job)
        sent = 0
        for model, group in sorted(by_model.items()):
            views = [
                JobView(
                    id=j.id,
                    priority=effective_priority(j, now, self.config.aging_s),
                    created_at=j.created_at,
                    outstanding=j.outstanding,
                    remaining=j.remaining_tasks,
                    level=9 - celery_priority(j.priority),
                )
                for j in group
            ]
            cap = capacity(holders.get(model, 0), self.config.queue_depth)
            by_id = {j.id: j for j in group}
            for job_id, n in plan_releases(views, cap):
                job = by_id[job_id]
                plan = job.plan
                cell_end = (plan.task(min(job.cursor, plan.n_tasks - 1)).cell + 1) * (
                    plan.tasks_per_cell
                )
                for task_no in self.ledger.release(job_id, n, cursor_limit=cell_end):
                    task_model = plan.cell_settings(plan.task(task_no).cell)["model"]
                    self._send(job, task_no, task_model)
                    sent += 1
        self.released += sent
        return sent

    def _send(self, job: JobRecord, task_no: int, model: str) -> None:
        msg = RenderMessage(namespace=self.config.namespace, job_id=job.id, task_no=task_no)
        self.app.send_task(
            RENDER_TASK,
            kwargs=msg.model_dump(),
            queue=model_queue(self.config.namespace, model),
            priority=celery_priority(job.priority),
        )

    # the loop
    def run(self) -> None:
        log.info("scheduler on %s (namespace %s)", self.config.redis(), self.config.namespace)
        while not self.stop_event.is_set():
            try:
                self.tick()
                if self.leader:
                    # sleep until a task finishes or a job arrives, at most one interval
                    self.ledger.wait_wake(self.config.scheduler_interval)
                else:
                    self.stop_event.wait(self.config.leader_ttl / 3)
            except redis.ConnectionError as exc:
                log.warning("redis unavailable: %s", exc)
                self.stop_event.wait(1.0)
        if self.leader:
            self.lease.release()

    def stop(self) -> None:
        self.stop_event.set()


def _image_seconds(inventories: list[dict[str, Any]]) -> dict[str, float]:
    """Mean measured seconds per image by ``model:WxH:steps`` over the workers."""
    sums: dict[str, list[float]] = defaultdict(list)
    for w in inventories:
        for key, secs in (w.get("image_seconds") or {}).items():
            if isinstance(secs, (int, float)) and math.isfinite(secs) and secs > 0:
                sums[key].append(float(secs))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _mean_load(inventories: list[dict[str, Any]]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for w in inventories:
        for model, secs in (w.get("load_seconds") or {}).items():
            sums[model].append(float(secs))
    return {k: sum(v) / len(v) for k, v in sums.items()}
