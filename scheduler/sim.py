"""Discrete-event farm simulator that drives the real placement policy.

The modelled farm: ``workers`` GPUs, each holding one model in VRAM (and, optionally, the
last ``ram_slots`` models it dropped in host RAM, reloaded at ``ram_factor`` of the cost).
Jobs ``(model, images, priority, arrival)`` arrive over time; a worker renders tasks of up
to ``batch`` images of the model it holds, and switching model costs that model's load time
first. Loads and tasks are not interrupted.

``simulate`` is the farm: after every batch of simultaneous events (a job arrives, a task
or a load ends) it calls ``placement.place`` with the workers' state and the per-model
backlog, then each idle worker loads its assigned model or takes that model's next task,
the job chosen by ``policy.plan_releases`` (priority, then fair share); with a
``min_dwell_s`` it also replans when a fresh assignment's dwell ends. ``simulate_naive``
is the baseline: one shared FIFO queue of tasks in arrival order; every idle worker takes
the next task whatever its model, loading it if needed and keeping only that one.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from scheduler import placement
from scheduler.placement import ModelDemand, PlacementParams, WorkerState
from scheduler.policy import JobView, plan_releases


@dataclass(frozen=True)
class SimJob:
    id: str
    model: str
    images: int
    priority: int = 50
    arrival: float = 0.0


@dataclass(frozen=True)
class SimFarm:
    workers: int
    load_s: Mapping[str, float] = field(default_factory=dict, hash=False)  # per model
    default_load_s: float = 30.0  # models missing from load_s
    render_s: float = 2.0  # seconds per image
    batch: int = 4  # images per task
    ram_slots: int = 0  # models a worker keeps in host RAM after dropping them
    ram_factor: float = 0.1

    def load(self, model: str) -> float:
        return self.load_s.get(model, self.default_load_s)


@dataclass
class SimResult:
    loads: int
    makespan_s: float
    mean_jct_s: float
    p95_jct_s: float
    render_fraction: float  # render seconds / (workers * makespan)
    jct_s: dict[str, float]  # job id -> finish - arrival
    finish_s: dict[str, float]  # job id -> finish time
    loads_by_worker: dict[str, int]


@dataclass
class _Worker:
    name: str
    loaded: str | None = None  # in VRAM (or being loaded)
    target: str | None = None  # what placement assigned
    assigned_at: float = 0.0
    busy: bool = False
    ram: list[str] = field(default_factory=list)  # most recent first
    loads: int = 0
    task: tuple[str, int] | None = None  # (job id, images) being rendered


@dataclass
class _Job:
    spec: SimJob
    pending: int  # images not started
    unfinished: int  # images not done
    outstanding: int = 0  # tasks running
    finish: float | None = None


class _Sim:
    def __init__(self, farm: SimFarm, jobs: Sequence[SimJob]):
        if farm.workers < 1:
            raise ValueError("workers must be at least 1")
        self.farm = farm
        self.workers = [_Worker(f"w{i:03d}") for i in range(farm.workers)]
        self.jobs: dict[str, _Job] = {}
        self.heap: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.rendered_s = 0.0
        self.now = 0.0
        for j in sorted(jobs, key=lambda j: (j.arrival, j.id)):
            if j.images < 1:
                raise ValueError(f"job {j.id}: images must be at least 1")
            self.push(j.arrival, "arrive", j)

    def push(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    def start_load(self, w: _Worker, model: str) -> None:
        cost = self.farm.load(model)
        if model in w.ram:
            cost *= self.farm.ram_factor
            w.ram.remove(model)
        if w.loaded is not None and self.farm.ram_slots > 0:
            w.ram = [w.loaded, *w.ram][: self.farm.ram_slots]
        w.loaded, w.busy, w.task = model, True, None
        w.loads += 1
        self.push(self.now + cost, "free", w)

    def start_task(self, w: _Worker, job: _Job, n: int) -> None:
        job.pending -= n
        job.outstanding += 1
        w.busy, w.task = True, (job.spec.id, n)
        self.push(self.now + n * self.farm.render_s, "free", w)

    def finish(self, w: _Worker) -> None:
        w.busy = False
        if w.task is not None:
            job = self.jobs[w.task[0]]
            job.unfinished -= w.task[1]
            job.outstanding -= 1
            self.rendered_s += w.task[1] * self.farm.render_s
            if job.unfinished == 0:
                job.finish = self.now
            w.task = None

    def run(self, step: Callable[[], None]) -> SimResult:
        while self.heap:
            self.now = self.heap[0][0]
            while self.heap and self.heap[0][0] == self.now:
                _, _, kind, payload = heapq.heappop(self.heap)
                if kind == "arrive":
                    assert isinstance(payload, SimJob)
                    self.jobs[payload.id] = _Job(payload, payload.images, payload.images)
                    self.on_arrive(payload)
                elif kind == "free":
                    assert isinstance(payload, _Worker)
                    self.finish(payload)
            step()
        return self.result()

    def on_arrive(self, job: SimJob) -> None:
        pass

    def result(self) -> SimResult:
        finish = {i: j.finish for i, j in self.jobs.items()}
        if any(f is None for f in finish.values()):
            raise RuntimeError("simulation ended with unfinished jobs (no worker may take them)")
        done = {i: float(f) for i, f in finish.items() if f is not None}
        jct = {i: done[i] - j.spec.arrival for i, j in self.jobs.items()}
        makespan = max(done.values(), default=0.0)
        ranked = sorted(jct.values())
        p95 = ranked[max(0, math.ceil(0.95 * len(ranked)) - 1)] if ranked else 0.0
        return SimResult(
            loads=sum(w.loads for w in self.workers),
            makespan_s=makespan,
            mean_jct_s=sum(ranked) / len(ranked) if ranked else 0.0,
            p95_jct_s=p95,
            render_fraction=self.rendered_s / (len(self.workers) * makespan) if makespan else 0.0,
            jct_s=jct,
            finish_s=done,
            loads_by_worker={w.name: w.loads for w in self.workers},
        )


class _FarmSim(_Sim):
    def __init__(
        self,
        farm: SimFarm,
        jobs: Sequence[SimJob],
        params: PlacementParams,
        notice_s: float = 0.0,
    ):
        super().__init__(farm, jobs)
        self.params = params
        # a reference, not a policy: placement is told of each job notice_s before it
        # arrives (it still cannot render one before then), and replans when it is told
        self.notice_s = notice_s
        self.future = sorted(jobs, key=lambda j: (j.arrival, j.id)) if notice_s > 0 else []
        for j in self.future:
            if 0 < j.arrival - notice_s:
                self.push(j.arrival - notice_s, "tick", None)

    def demands(self) -> list[ModelDemand]:
        by_model: dict[str, list[tuple[SimJob, int]]] = {}
        for j in self.jobs.values():
            if j.unfinished > 0:
                by_model.setdefault(j.spec.model, []).append((j.spec, j.unfinished))
        for spec in self.future:
            if spec.id not in self.jobs and spec.arrival - self.notice_s <= self.now:
                by_model.setdefault(spec.model, []).append((spec, spec.images))
        return [
            ModelDemand(
                model=m,
                backlog_s=sum(n for _, n in js) * self.farm.render_s,
                priority=max(spec.priority for spec, _ in js),
                oldest=min(spec.arrival for spec, _ in js),
            )
            for m, js in sorted(by_model.items())
        ]

    def states(self) -> list[WorkerState]:
        models = {j.spec.model for j in self.jobs.values()}
        load_s = {m: self.farm.load(m) for m in sorted(models)}
        return [
            WorkerState(
                name=w.name,
                model=w.target,
                ram=frozenset(w.ram) | frozenset({w.loaded} - {w.target, None}),
                assigned_at=w.assigned_at,
                load_s=load_s,
            )
            for w in self.workers
        ]

    def next_job(self, model: str) -> _Job | None:
        js = [j for j in self.jobs.values() if j.spec.model == model and j.pending > 0]
        if not js:
            return None
        views = [
            JobView(
                j.spec.id,
                j.spec.priority,
                j.spec.arrival,
                j.outstanding,
                math.ceil(j.pending / self.farm.batch),
            )
            for j in js
        ]
        grants = plan_releases(views, sum(v.outstanding for v in views) + 1)
        return self.jobs[grants[0][0]]

    def step(self) -> None:
        plan = placement.place(self.states(), self.demands(), self.now, self.params)
        for w in self.workers:
            new = plan.get(w.name, w.target)
            if new != w.target:
                w.target, w.assigned_at = new, self.now
                if self.params.min_dwell_s > 0:
                    self.push(self.now + self.params.min_dwell_s, "tick", None)
        for w in self.workers:
            if w.busy or w.target is None:
                continue
            if w.loaded != w.target:
                self.start_load(w, w.target)
            elif (job := self.next_job(w.target)) is not None:
                self.start_task(w, job, min(self.farm.batch, job.pending))


class _NaiveSim(_Sim):
    def __init__(self, farm: SimFarm, jobs: Sequence[SimJob]):
        self.queue: deque[tuple[str, int]] = deque()
        self.then: dict[str, tuple[str, int]] = {}  # worker -> task to render after its load
        super().__init__(farm, jobs)

    def on_arrive(self, job: SimJob) -> None:
        for start in range(0, job.images, self.farm.batch):
            self.queue.append((job.id, min(self.farm.batch, job.images - start)))

    def step(self) -> None:
        for w in self.workers:
            if w.busy:
                continue
            task = self.then.pop(w.name, None)
            if task is None:
                if not self.queue:
                    continue
                task = self.queue.popleft()
            job = self.jobs[task[0]]
            if w.loaded != job.spec.model:
                self.start_load(w, job.spec.model)
                self.then[w.name] = task
            else:
                self.start_task(w, job, task[1])


def simulate(
    farm: SimFarm,
    jobs: Sequence[SimJob],
    params: PlacementParams | None = None,
    clairvoyant: bool = False,
    notice_s: float = 0.0,
) -> SimResult:
    """The farm's policy: ``placement.place`` decides, per-model queues feed the workers.

    References for how much of the gap to an offline bound is what an online farm cannot
    know: with ``notice_s``, placement is told of each job that many seconds before it
    arrives (as if it had been announced); with ``clairvoyant``, from t=0."""
    params = params or PlacementParams(
        default_load_s=farm.default_load_s, ram_factor=farm.ram_factor
    )
    if notice_s < 0:
        raise ValueError("notice_s must be at least 0")
    sim = _FarmSim(farm, jobs, params, math.inf if clairvoyant else notice_s)
    return sim.run(sim.step)


def simulate_naive(farm: SimFarm, jobs: Sequence[SimJob]) -> SimResult:
    """One shared FIFO queue; each free worker loads whatever its next task needs."""
    sim = _NaiveSim(farm, jobs)
    return sim.run(sim.step)
