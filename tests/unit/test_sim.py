"""Farm simulator: hand-checked cases, the naive baseline, and that it runs the real policy."""

import pytest

from scheduler import placement
from scheduler.placement import PlacementParams
from scheduler.sim import SimFarm, SimJob, simulate, simulate_naive


def farm(workers, **kw):
    return SimFarm(workers, default_load_s=30.0, render_s=2.0, batch=4, **kw)


def test_one_worker_one_model():
    r = simulate(farm(1), [SimJob("a", "m", 10)])
    assert r.loads == 1
    assert r.makespan_s == 30 + 10 * 2
    assert r.mean_jct_s == r.p95_jct_s == 50
    assert r.render_fraction == pytest.approx(20 / 50)


def test_one_worker_two_models_loads_each_once():
    jobs = [SimJob("a", "m", 10), SimJob("b", "n", 5, arrival=1.0)]
    r = simulate(farm(1), jobs)
    assert r.loads == 2
    assert r.finish_s == {"a": 50.0, "b": 50.0 + 30 + 10}
    assert r.jct_s["b"] == 89.0


def test_arrival_after_idle_and_per_model_load_times():
    f = SimFarm(1, load_s={"m": 10.0}, render_s=1.0, batch=2)
    r = simulate(f, [SimJob("a", "m", 3, arrival=100.0)])
    assert r.finish_s == {"a": 100 + 10 + 3}
    assert r.jct_s == {"a": 13.0}


def test_farm_keeps_models_where_naive_reloads():
    # two workers, two models, jobs interleaved: the farm loads each model once on one
    # worker; the shared FIFO queue makes both workers alternate between the models
    jobs = [SimJob(f"j{i}", "mn"[i % 2], 8, arrival=float(i)) for i in range(6)]
    ours = simulate(farm(2), jobs)
    naive = simulate_naive(farm(2), jobs)
    assert ours.loads == 2
    assert ours.loads_by_worker == {"w000": 1, "w001": 1}
    assert ours.makespan_s == 1 + 30 + 3 * 8 * 2  # n arrives at t=1, then 3 jobs of 16 s
    assert naive.loads > ours.loads
    assert naive.makespan_s > ours.makespan_s


def test_naive_queue_by_hand():
    # one worker, FIFO: m (load 30 + 8), n (load 30 + 8), m again (load 30 + 8)
    jobs = [SimJob("a", "m", 4), SimJob("b", "n", 4, 1.0), SimJob("c", "m", 4, 2.0)]
    r = simulate_naive(farm(1), jobs)
    assert r.loads == 3
    assert r.finish_s == {"a": 38.0, "b": 76.0, "c": 114.0}
    ours = simulate(farm(1), jobs)  # the farm finishes m's work before it switches
    assert ours.loads == 2
    assert ours.finish_s == {"a": 38.0, "c": 46.0, "b": 84.0}


def test_priority_job_overtakes_within_one_task():
    jobs = [SimJob("low", "m", 400, priority=10), SimJob("high", "m", 8, 90, arrival=50.0)]
    r = simulate(farm(1), jobs)
    # the high job starts when the running task (8 s) ends and finishes before the low one
    assert r.finish_s["high"] <= 50 + 8 + 8 * 2
    assert r.finish_s["high"] < r.finish_s["low"]


def test_sim_calls_the_placement_policy(monkeypatch):
    jobs = [SimJob("a", "m", 40), SimJob("b", "n", 40)]
    calls = []
    real = placement.place

    def one_worker_only(workers, demands, now, params):
        calls.append(now)
        plan = real(workers, demands, now, params)
        return {name: (m if name == "w000" else None) for name, m in plan.items()}

    before = simulate(farm(2), jobs)
    monkeypatch.setattr(placement, "place", one_worker_only)
    after = simulate(farm(2), jobs)
    assert calls
    assert before.loads_by_worker == {"w000": 1, "w001": 1}
    assert after.loads_by_worker == {"w000": 2, "w001": 0}
    assert after.makespan_s > before.makespan_s


def test_deterministic():
    jobs = [SimJob(f"j{i}", f"m{i % 3}", 10 + 7 * i, i % 2 * 40, float(3 * i)) for i in range(12)]
    params = PlacementParams(hysteresis=2.0)
    assert simulate(farm(4), jobs, params) == simulate(farm(4), jobs, params)
    assert simulate_naive(farm(4), jobs) == simulate_naive(farm(4), jobs)


def test_clairvoyant_reference_loads_before_the_job_arrives():
    # two workers; m's big job is there at t=0, n's small job comes at t=100. Online both
    # workers take m, and one must leave it for n when n arrives and come back after: 4
    # loads. Told the future, the second worker loads n at once and waits for the job,
    # which it renders from its arrival (4 tasks of 4 images, 8 s each), then joins m: 3.
    jobs = [SimJob("big", "m", 400), SimJob("late", "n", 16, arrival=100.0)]
    params = PlacementParams(default_load_s=30.0, hysteresis=1.0)
    online = simulate(farm(2), jobs, params)
    told = simulate(farm(2), jobs, params, clairvoyant=True)
    assert online.loads == 4
    assert online.finish_s["late"] > 100 + 30 + 32
    assert told.loads == 3
    assert told.finish_s["late"] == 100 + 32


def test_notice_tells_placement_of_a_job_that_long_before_it_arrives():
    # the jobs of the test above. Told of "late" 50 s ahead, the second worker leaves m in
    # time to have loaded n (30 s) when the job comes, so the job finishes as when told at
    # t=0, but that worker had taken m first (4 loads, not 3); told 10 s ahead it starts
    # loading at t=90 and the job waits for the rest of the load
    jobs = [SimJob("big", "m", 400), SimJob("late", "n", 16, arrival=100.0)]
    params = PlacementParams(default_load_s=30.0, hysteresis=1.0)
    online = simulate(farm(2), jobs, params)
    told = simulate(farm(2), jobs, params, clairvoyant=True)
    ahead = simulate(farm(2), jobs, params, notice_s=50.0)
    short = simulate(farm(2), jobs, params, notice_s=10.0)
    assert ahead.finish_s["late"] == told.finish_s["late"] == 100 + 32
    assert (ahead.loads, told.loads) == (4, 3)
    assert 100 + 32 < short.finish_s["late"] < online.finish_s["late"]
    assert simulate(farm(2), jobs, params, notice_s=0.0) == online
    with pytest.raises(ValueError, match="notice_s"):
        simulate(farm(2), jobs, params, notice_s=-1.0)
