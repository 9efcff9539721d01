"""A job's tasks split by model (pure: a JobRecord built by hand)."""

from __future__ import annotations

from farm.jobs import JobRecord
from farm.spec import JobSpec
from scheduler.service import Lane, job_lanes


def record(spec: JobSpec, **kw: object) -> JobRecord:
    base: dict[str, object] = dict(
        id="j", spec=spec, state="running", priority=50, total=16, n_tasks=8, done=0,
        failed=0, cursor=0, inflight=0, requeued=0, tasks_started=0, tasks_finished=0,
        created_at=0.0, started_at=None, finished_at=None,
    )  # fmt: skip
    base.update(kw)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_a_model_sweep_has_one_lane_per_model() -> None:
    # cells: (model, cfg) = (a, 3) (a, 5) (b, 3) (b, 5); 2 tasks of 2 images per cell
    spec = JobSpec(model="a", prompt="x", count=4, batch_size=2, seed=1,
                   sweep={"model": ["a", "b"], "cfg_scale": [3, 5]})  # fmt: skip
    job = record(
        spec,
        cursor=3,  # cell 0 fully out (tasks 0, 1), cell 2 half (task 4)
        cell_cursors={0: 2, 2: 5},
        requeued=1,
        requeue_tasks=(1,),  # given back
        pending_tasks=(0,),  # out, not claimed
        inflight=2,
    )
    lanes = job_lanes(job, claimed={4})
    assert lanes == {
        "a": Lane(cells=(0, 1), unreleased=1 + 2, outstanding=1),
        "b": Lane(cells=(2, 3), unreleased=1 + 2, outstanding=1),
    }


def test_a_single_model_job_is_one_lane() -> None:
    spec = JobSpec(model="a", prompt="x", count=4, batch_size=2, seed=1,
                   sweep={"cfg_scale": [3, 5]})  # fmt: skip
    job = record(spec, total=8, n_tasks=4, cursor=3, cell_cursors={0: 2, 1: 3}, inflight=2)
    assert job_lanes(job) == {"a": Lane(cells=(1,), unreleased=1, outstanding=2)}
    done = record(spec, total=8, n_tasks=4, cursor=4, cell_cursors={0: 2, 1: 4})
    assert job_lanes(done) == {"a": Lane(cells=(), unreleased=0, outstanding=0)}
