"""The scheduler loop: places models on workers and meters tasks into per-model queues.

Each round, on the leader only (a Redis lease elects one among replicas):

1. Recover: tasks claimed by a worker whose heartbeat expired go back to their model's
   queue at once, without waiting for the broker's visibility timeout (a duplicate run is
   harmless: the ledger counts an image once). Tasks released and not claimed whose
   message the broker no longer holds anywhere go again too (``resend_lost``).
2. Place: from the workers' inventories and each model's backlog, the pure placement
   policy (``scheduler.placement.place``) says which model each worker serves; changes are
   written to Redis, where each worker picks up its own entry.
3. Release: per model queue, runnable jobs get free slots (``capacity`` tasks released and
   unfinished per holder) by priority, fair share among equals, and aging, so the broker
   queue stays shallow and priorities, pause and cancel act within one task.

A job whose sweep spans several models has one lane per model (``job_lanes``): each model's
share of its backlog counts for that model in placement, and each lane is released into its
own model's queue, so the models of a sweep render side by side on their own workers.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import kombu.exceptions
import redis

from farm.celery_app import RenderMessage, celery_priority, held_tasks, make_app, send_render
from farm.config import Config
from farm.jobs import RUNNABLE, JobRecord, Ledger
from farm.redis_client import connect
from farm.workers_registry import Assignments, Backlog, WorkerRegistry
from scheduler.placement import ModelDemand, PlacementParams, WorkerState, place
from scheduler.policy import JobView, capacity, plan_releases

log = logging.getLogger("farm.scheduler")

# seconds between two looks for released, unclaimed tasks whose message the broker lost; a
# task missing at two looks in a row is sent again, so within 2 x LOST_LOOK_S and a round
LOST_LOOK_S = 5.0

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


@dataclass(frozen=True)
class Lane:
    """A job's tasks of one model."""

    cells: tuple[int, ...]  # the cells with tasks left to release, in order
    unreleased: int  # tasks not released yet, or given back to be released again
    outstanding: int  # tasks released and not finished


def job_lanes(
    job: JobRecord, claimed: Collection[int] = (), max_cells: int | None = None
) -> dict[str, Lane]:
    """The job's tasks by model. ``claimed``: its tasks that workers have claimed and not
    finished (with the job's ``pending_tasks``, what is outstanding per model).
    ``max_cells``: list at most this many cells per lane (a release never needs more cells
    than tasks); the counts are exact either way.

    O(tasks given back + cells released from at or after ``full_cells``) and, with
    ``max_cells``, O(max_cells) more: the cells never released from are counted and listed
    by arithmetic, so a sweep of a million cells costs no more than one of ten."""
    plan = job.plan
    tpc = plan.tasks_per_cell
    back = Counter(t // tpc for t in job.requeue_tasks)
    full, cursors = job.full_cells, job.cell_cursors
    # from the tail on, no cell was released from nor has a task given back
    tail = max(full, max(cursors, default=-1) + 1, max(back, default=-1) + 1)
    unreleased: dict[str, int] = defaultdict(int)
    cells: dict[str, list[int]] = defaultdict(list)
    for cell in sorted({*back, *range(full, tail)}):
        lo = cell * tpc
        fresh = lo + tpc - cursors.get(cell, lo) if cell >= full else 0
        left = fresh + back[cell]
        if left > 0:
            model = plan.cell_model(cell)
            unreleased[model] += left
            cells[model].append(cell)
    names = plan.models()
    for model in names:
        listed = cells[model]
        if tail < plan.n_cells:
            unreleased[model] += plan.count_model_cells(model, tail) * tpc
            room = None if max_cells is None else max(0, max_cells - len(listed))
            listed.extend(itertools.islice(plan.model_cells(model, tail), room))
        if max_cells is not None:
            del listed[max_cells:]
    outstanding: dict[str, int] = defaultdict(int)
    if len(names) == 1:
        outstanding[names[0]] = job.outstanding
    else:
        for t in {*job.pending_tasks, *claimed}:
            outstanding[plan.task_model(t)] += 1
    return {m: Lane(tuple(cells[m]), unreleased[m], outstanding[m]) for m in names}


def effective_priority(job: JobRecord, now: float, aging_s: float) -> int:
    """Priority plus one step per ``aging_s`` the job has waited for a release."""
    waited = now - (job.last_release or job.created_at)
    return job.priority + (int(waited // aging_s) if aging_s > 0 else 0)


class Scheduler:
    def __init__(self, config: Config, client: redis.Redis | None = None):
        if config.task_losses < 1:
            raise ValueError(f"FARM_TASK_LOSSES={config.task_losses}: must be at least 1")
        self.config = config
        self.r = client or connect(config)
        self.ledger = Ledger(self.r, config.namespace)
        self.workers = WorkerRegistry(self.r, config.namespace)
        self.assignments = Assignments(self.r, config.namespace)
        self.lease = Lease(self.r, config.namespace, config.leader_ttl)
        self.backlog_record = Backlog(self.r, config.namespace)
        # model -> {"images", "seconds"} left, summed by demands() each round
        self.backlog: dict[str, dict[str, float]] = {}
        self.app = make_app(config)
        self.params = PlacementParams(
            default_load_s=config.default_load_s, min_dwell_s=config.min_dwell_s
        )
        self.stop_event = threading.Event()
        self.released = 0
        self.recovered = 0
        self.leader = False
        self.last_stale_scan = -math.inf
        self.last_lost_look = -math.inf
        # released, unclaimed tasks the broker held nowhere at the last look
        self.missing: set[tuple[str, int]] = set()
        # the features (farm.spec.FEATURES) every worker on a model renders, as placed this
        # round; and the (job, model) lanes held back for a feature one of them lacks
        self.model_features: dict[str, frozenset[str]] = {}
        self.held_back: set[tuple[str, str]] = set()
        # tasks released in the ledger whose message the broker did not take (it was away):
        # sent first thing next round
        self.unsent: list[Message] = []
        # a release cut off by a Redis error may have released tasks whose numbers never
        # came back: the next round sends every task released and not claimed
        self.release_cut_off = False

    # one round
    def tick(self, now: float | None = None) -> int:
        """One round if leader. Returns the number of tasks sent."""
        was_leader = self.leader
        self.leader = self.lease.hold()
        if not self.leader:
            self.unsent.clear()  # a new leader sends every release not claimed again
            return 0
        now = time.time() if now is None else now
        unsent, self.unsent = self.unsent, []
        if unsent and not self.release_cut_off:  # else the full resend below sends them
            self._send_all(unsent)
        running = self.ledger.running()  # read before the inventories: see recover()
        inventories = self.workers.live()
        self.recover(running, inventories)
        jobs = [j for j in self.ledger.active() if j.state in RUNNABLE]
        # a new leader sends again every release not claimed yet: the one before may have
        # died between releasing a task and sending it (a duplicate is harmless); after
        # that, a look every quarter of resend_after is enough (a task is sent again
        # between 1 and 1.25 resend_after after its release) and keeps rounds cheap
        if not was_leader or self.release_cut_off:
            self.resend_stale(jobs, now, 0.0)
            self.release_cut_off = False
        elif now - self.last_stale_scan >= self.config.resend_after / 4:
            self.resend_stale(jobs, now, self.config.resend_after)
        if now - self.last_lost_look >= LOST_LOOK_S:
            self.resend_lost(jobs, now)
        claimed: dict[str, set[int]] = defaultdict(set)
        for tasks in running.values():
            for job_id, task_no in tasks:
                claimed[job_id].add(task_no)
        # no model's queue takes more tasks a round than every worker's share of it
        most = capacity(len(inventories), self.config.queue_depth)
        lanes = {j.id: job_lanes(j, claimed[j.id], most) for j in jobs}
        holders = self.place(inventories, jobs, now, lanes)
        return self.release(jobs, holders, now, lanes)

    def resend_stale(self, jobs: list[JobRecord], now: float, older_than: float) -> None:
        """Send again the tasks released more than ``older_than`` seconds ago and never
        claimed (a scheduler that died between release and send, a message lost by the
        broker)."""
        self.last_stale_scan = now
        by_id = {j.id: j for j in jobs}
        out = []
        for job_id, tasks in self.ledger.stale_releases(list(by_id), older_than, now).items():
            job = by_id[job_id]
            for task_no in tasks:
                out.append(_message(job, task_no, job.plan.task_model(task_no)))
                log.warning("task %s/%s was never claimed; sent again", job.id, task_no)
        self.recovered += len(out)
        self._send_all(out)

    def resend_lost(self, jobs: list[JobRecord], now: float) -> None:
        """Send again the tasks released and not claimed whose message the broker held
        nowhere, neither in a queue nor delivered and unacked, at this look and the last.

        A worker moves a message from its queue to the unacked hash in two steps; one cut
        off from Redis in between (its server failed over, or the worker died) has taken
        the message out of the broker for good, and the broker would never hand it out
        again. A message between the two steps, or a task claimed since the pending list
        was read, is missing at one look only: the next finds it or its claim."""
        self.last_lost_look = now
        pending = {(j.id, t) for j in jobs for t in j.pending_tasks}
        pending -= {(job_id, task_no) for job_id, task_no, *_ in self.unsent}
        if not pending:
            self.missing = set()
            return
        by_id = {j.id: j for j in jobs}
        models = {by_id[job_id].plan.task_model(t) for job_id, t in pending}
        missing = pending - held_tasks(self.r, self.config.namespace, models)
        lost, self.missing = missing & self.missing, missing - self.missing
        if not lost:
            return
        out: dict[str, list[int]] = defaultdict(list)
        for job_id, task_no in sorted(lost):
            out[job_id].append(task_no)
            log.warning(
                "task %s/%s: its message is lost from the broker; sent again", job_id, task_no
            )
        self.ledger.renew_releases(out, now)
        messages = [
            _message(by_id[j], t, by_id[j].plan.task_model(t)) for j, ts in out.items() for t in ts
        ]
        self.recovered += len(messages)
        self._send_all(messages)

    def recover(self, running: dict[str, list[tuple[str, int]]], inventories: list[dict]) -> None:
        live = {w.get("instance", w["name"]) for w in inventories}
        for instance, tasks in running.items():
            if instance in live:
                continue
            for job_id, task_no in tasks:
                try:
                    job: JobRecord | None = self.ledger.get(job_id)
                except KeyError:
                    job = None
                if job is not None and job.state in RUNNABLE:
                    # a task that every worker dies of (a crash in a driver, a hang, the
                    # host's OOM killer) would take the whole farm down one worker after
                    # another: past FARM_TASK_LOSSES deaths its images fail instead
                    losses, new = self.ledger.lose_task(job_id, task_no, instance)
                    give_up = losses >= self.config.task_losses
                    if new:
                        self._record_loss(job, task_no, instance, losses, give_up)
                    if give_up:
                        self._give_up(job_id, task_no, instance, losses)
                    else:
                        # sent before the claim is dropped: if the broker is away, the
                        # claim stays and the next round tries again
                        self._send(_message(job, task_no, job.plan.task_model(task_no)))
                        self.recovered += 1
                        self.ledger.event(
                            {"type": "task-recovered", "job": job_id, "task": task_no,
                             "dead": instance, "losses": losses}
                        )  # fmt: skip
                        log.warning(
                            "worker %s is gone; task %s/%s sent again", instance, job_id, task_no
                        )
                self.ledger.forget_running(job_id, task_no, instance)

    def _record_loss(
        self, job: JobRecord, task_no: int, instance: str, losses: int, give_up: bool
    ) -> None:
        then = "its images fail" if give_up else "the task goes to another worker"
        self.ledger.record_error(
            job.id,
            task_no,
            job.plan.task(task_no).images,
            stage="lost",
            error=f"worker process {instance} died or hung holding the task "
            f"({losses} of FARM_TASK_LOSSES={self.config.task_losses}); {then}",
            worker=instance.partition("#")[0],
            model=job.plan.task_model(task_no),
            images_failed=give_up,
        )

    def _give_up(self, job_id: str, task_no: int, instance: str, losses: int) -> None:
        self.ledger.fail_task(job_id, task_no)
        self.ledger.event(
            {"type": "task-failed", "job": job_id, "task": task_no, "dead": instance,
             "losses": losses,
             "reason": f"{losses} worker processes died holding it (FARM_TASK_LOSSES)"}
        )  # fmt: skip
        log.error(
            "task %s/%s: %d worker processes died holding it; its images are failed "
            "(a retry renders them again)",
            job_id,
            task_no,
            losses,
        )

    def demands(
        self,
        jobs: list[JobRecord],
        inventories: list[dict],
        now: float,
        lanes: dict[str, dict[str, Lane]],
    ) -> list:
        per_image = _image_seconds(inventories)
        self.backlog = {}
        out = []
        for job in jobs:
            s = job.spec
            job_lanes_ = lanes[job.id]
            left = max(0, job.total - job.done - job.failed)
            batch = job.plan.batch_size
            for model, lane in job_lanes_.items():
                if len(job_lanes_) > 1:  # a model's share: its tasks left, at full batches
                    images = min(left, (lane.unreleased + lane.outstanding) * batch)
                else:
                    images = left
                key = f"{model}:{s.width}x{s.height}:{s.steps}"
                secs = per_image.get(key, self.config.default_image_s)
                left_of = self.backlog.setdefault(model, {"images": 0, "seconds": 0.0})
                left_of["images"] += images
                left_of["seconds"] += images * secs
                out.append(
                    ModelDemand(model, images * secs,
                                effective_priority(job, now, self.config.aging_s),
                                job.created_at)
                )  # fmt: skip
        return out

    def place(
        self,
        inventories: list[dict],
        jobs: list[JobRecord],
        now: float,
        lanes: dict[str, dict[str, Lane]],
    ) -> dict[str, int]:
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
        decision = place(states, self.demands(jobs, inventories, now, lanes), now, self.params)
        instances = {w["name"]: w.get("instance", "") for w in inventories}
        features = {w["name"]: frozenset(w.get("features") or ()) for w in inventories}
        self.model_features = {}
        holders: dict[str, int] = defaultdict(int)
        for name, model in decision.items():
            if model:
                have = features.get(name, frozenset())
                self.model_features[model] = self.model_features.get(model, have) & have
            if model != current.get(name, (None, 0.0))[0]:
                load = self.assignments.set(name, model, now, instances.get(name, ""))
                self.ledger.event(
                    {"type": "assign", "worker": name, "model": model or "", "load": int(load)}
                )
                log.info("worker %s -> model %s", name, model)
            if model:
                holders[model] += 1
        published = {
            m: {"images": left["images"], "seconds": round(left["seconds"], 3),
                "workers": holders.get(m, 0)}
            for m, left in self.backlog.items()
            if left["images"] or holders.get(m)
        }  # fmt: skip
        for m, n in holders.items():
            published.setdefault(m, {"images": 0, "seconds": 0.0, "workers": n})
        self.backlog_record.publish(published, ttl=max(10.0, 4 * self.config.leader_ttl))
        return holders

    def release(
        self,
        jobs: list[JobRecord],
        holders: dict[str, int],
        now: float,
        lanes: dict[str, dict[str, Lane]],
    ) -> int:
        by_model: dict[str, list[tuple[JobRecord, Lane]]] = defaultdict(list)
        held_back: set[tuple[str, str]] = set()
        for job in jobs:
            needs = job.spec.needs()
            for model, lane in lanes[job.id].items():
                if not (lane.unreleased or lane.outstanding):
                    continue
                have = self.model_features.get(model)
                if needs and (have is None or not needs <= have):
                    # no worker holds the model yet (tasks released now could go to any
                    # that takes it), or one on it is older than a feature the job needs and
                    # would render the images without it: the job waits
                    held_back.add((job.id, model))
                    if have is not None and (job.id, model) not in self.held_back:
                        lacking = ", ".join(sorted(needs - have))
                        log.warning("job %s waits: a worker on model %s does not render %s "
                                    "(an older version)", job.id, model, lacking)  # fmt: skip
                    continue
                by_model[model].append((job, lane))
        self.held_back = held_back
        out: list[Message] = []
        try:  # what the ledger released goes out even if a later release fails
            for model, group in sorted(by_model.items()):
                self._release_model(model, group, holders.get(model, 0), now, out)
        finally:
            self.released += len(out)
            self._send_all(out)
        return len(out)

    def _release_model(
        self,
        model: str,
        group: list[tuple[JobRecord, Lane]],
        holders: int,
        now: float,
        out: list[Message],
    ) -> None:
        """Release the tasks of one model's queue into ``out``."""
        views = [
            JobView(
                id=j.id,
                priority=effective_priority(j, now, self.config.aging_s),
                created_at=j.created_at,
                outstanding=lane.outstanding,
                remaining=lane.unreleased,
                level=9 - celery_priority(j.priority),
            )
            for j, lane in group
        ]
        cap = capacity(holders, self.config.queue_depth)
        by_id = {j.id: (j, lane) for j, lane in group}
        for job_id, n in plan_releases(views, cap):
            job, lane = by_id[job_id]
            # each of the lane's cells has a task left: n cells are enough for n tasks; the
            # lane's cells, given-back tasks included, are all of this model
            cells = lane.cells[:n]
            try:
                released = self.ledger.release(job_id, n, cells, job.plan.tasks_per_cell)
            except redis.RedisError:
                self.release_cut_off = True  # it may have run, its answer lost
                raise
            out.extend(_message(job, task_no, model) for task_no in released)

    def _send_all(self, messages: list[Message]) -> None:
        """Send in order. If the broker is away, the ones not sent are kept for the next
        round (their tasks are released in the ledger already) and the error goes up."""
        for i, m in enumerate(messages):
            try:
                self._send(m)
            except (kombu.exceptions.OperationalError, redis.RedisError):
                self.unsent.extend(messages[i:])
                raise

    def _send(self, m: Message) -> None:
        job_id, task_no, model, priority = m
        msg = RenderMessage(namespace=self.config.namespace, job_id=job_id, task_no=task_no)
        send_render(self.app, msg, model, priority)

    # the loop
    def run(self) -> None:
        log.info("scheduler on %s (namespace %s)", self.config.redis(), self.config.namespace)
        while not self.stop_event.is_set():
            try:
                self.tick()
                if self.leader:
                    # sleep until a task finishes or a job arrives, at most one interval
                    # a blocking wait longer than redis_timeout would read as Redis away
                    self.ledger.wait_wake(
                        min(self.config.scheduler_interval, self.config.redis_timeout / 2)
                    )
                else:
                    self.stop_event.wait(self.config.leader_ttl / 3)
            except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
                # Redis (ledger and broker) away or restarting: the round is tried again
                log.warning("redis unavailable: %s", exc)
                self.stop_event.wait(1.0)
            except Exception:  # noqa: BLE001 - one bad round must not stop the farm
                log.exception("scheduler round failed")
                self.stop_event.wait(1.0)
        if self.leader:
            self.lease.release()

    def stop(self) -> None:
        self.stop_event.set()


# a render task to send: job id, task number, model (its queue), job priority (0-100)
Message = tuple[str, int, str, int]


def _message(job: JobRecord, task_no: int, model: str) -> Message:
    return (job.id, task_no, model, job.priority)


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
