"""Placement policy (pure): cover, grow by backlog, cache tiers, keep, hysteresis, blocks,
priority preemption, determinism."""

import random

from scheduler.placement import ModelDemand, PlacementParams, WorkerState, load_cost, place

P = PlacementParams(default_load_s=30.0, hysteresis=1.5)


def w(name, model=None, **kw):
    return WorkerState(name, model, **kw)


def d(model, backlog_s, priority=50, oldest=0.0):
    return ModelDemand(model, backlog_s, priority, oldest)


def holders(plan, model):
    return sorted(n for n, m in plan.items() if m == model)


def test_new_model_gets_a_holder_even_when_every_worker_is_busy():
    ws = [w("a", "x"), w("b", "x"), w("c", "x"), w("d", "y")]
    plan = place(ws, [d("x", 10_000), d("y", 10_000), d("z", 10)], 0.0, P)
    assert len(holders(plan, "z")) == 1
    assert holders(plan, "y") == ["d"]  # never leaves a model with backlog at zero
    assert len(holders(plan, "x")) == 2


def test_the_holder_comes_from_the_model_that_finishes_earliest_without_it():
    ws = [w("a", "x"), w("b", "x"), w("c", "x"), w("d", "y"), w("e", "y")]
    # x: 3 holders, 300 s left (150 s with 2); y: 2 holders, 10,000 s left (10,000 s with 1)
    plan = place(ws, [d("x", 300), d("y", 10_000), d("z", 10)], 0.0, P)
    assert holders(plan, "y") == ["d", "e"]
    assert len(holders(plan, "x")) == 2


def test_free_worker_covers_a_new_model_before_any_is_taken():
    ws = [w("a", "x"), w("b", "x"), w("c", "old")]
    plan = place(ws, [d("x", 10_000), d("z", 10)], 0.0, P)
    assert plan == {"a": "x", "b": "x", "c": "z"}


def test_one_more_holder_only_when_backlog_exceeds_holders_times_load():
    ws = [w("a", "x"), w("b", None)]
    # 1 holder, load 30 s, hysteresis 1.5: grows only when backlog > 45 s
    assert place(ws, [d("x", 44)], 0.0, P)["b"] is None
    assert place(ws, [d("x", 46)], 0.0, P)["b"] == "x"
    ws3 = [w("a", "x"), w("b", "x"), w("c", None)]  # 2 holders: needs > 90 s
    assert place(ws3, [d("x", 89)], 0.0, P)["c"] is None
    assert place(ws3, [d("x", 91)], 0.0, P)["c"] == "x"


def test_grows_to_as_many_holders_as_the_backlog_pays_for():
    ws = [w(f"w{i}") for i in range(10)]
    plan = place(ws, [d("x", 200)], 0.0, P)
    # k holders while 200 > 1.5 * k * 30 holds for the k-th added: k = 0..4, so 5 holders
    assert len(holders(plan, "x")) == 5


def test_ram_and_disk_copies_are_preferred():
    params = PlacementParams(default_load_s=30.0)
    plain, disk, ram = w("a"), w("b", disk=frozenset({"x"})), w("c", ram=frozenset({"x"}))
    assert load_cost(plain, "x", params) == 30.0
    assert load_cost(disk, "x", params) == 15.0
    assert load_cost(ram, "x", params) == 3.0
    assert load_cost(w("d", "x"), "x", params) == 0.0
    assert load_cost(w("e", load_s={"x": 12.0}), "x", params) == 12.0
    assert place([plain, disk, ram], [d("x", 5)], 0.0, P) == {"a": None, "b": None, "c": "x"}
    assert place([plain, disk], [d("x", 5)], 0.0, P) == {"a": None, "b": "x"}


def test_keeps_its_model_while_it_has_backlog_and_is_free_once_it_has_none():
    ws = [w("a", "x"), w("b", "y")]
    plan = place(ws, [d("x", 1), d("y", 100_000, priority=60)], 0.0, P)
    assert plan == {"a": "x", "b": "y"}  # x's last image still keeps its worker
    plan = place(ws, [d("x", 0), d("y", 100_000)], 0.0, P)
    assert plan == {"a": "y", "b": "y"}
    assert place(ws, [], 0.0, P) == {"a": "x", "b": "y"}  # idle: keeps what it holds


def test_hysteresis_prevents_flapping_on_small_changes():
    ws = [w("a", "x"), w("b", "y"), w("c", None)]
    params = PlacementParams(default_load_s=30.0, hysteresis=4.0)
    seen = set()
    for backlog in (100, 110, 95, 119, 105):  # all below 4 * 1 * 30 = 120
        plan = place(ws, [d("x", backlog), d("y", 200 - backlog)], 0.0, params)
        seen.add(tuple(sorted(plan.items())))
    assert seen == {(("a", "x"), ("b", "y"), ("c", None))}
    # holders stay while their model has backlog, whatever the other model's size
    plan = place(ws[:2], [d("x", 10), d("y", 1_000_000)], 0.0, params)
    assert plan == {"a": "x", "b": "y"}


def test_min_dwell_protects_a_fresh_assignment():
    ws = [w("a", "x", assigned_at=95.0), w("b", "x", assigned_at=95.0)]
    params = PlacementParams(min_dwell_s=10.0)
    assert holders(place(ws, [d("x", 10_000), d("z", 10)], 100.0, params), "z") == []
    assert len(holders(place(ws, [d("x", 10_000), d("z", 10)], 106.0, params), "z")) == 1


def test_blocked_model_is_never_assigned():
    ws = [w("a", "x", blocked=frozenset({"x"})), w("b", None, blocked=frozenset({"x", "y"}))]
    plan = place(ws, [d("x", 10_000), d("y", 10_000, priority=100)], 0.0, P)
    assert plan["a"] == "y"  # drops x, which it may no longer serve
    assert plan["b"] is None
    for seed in range(20):
        rng = random.Random(seed)
        models = ["x", "y", "z"]
        ws = [
            w(f"w{i}", rng.choice([*models, None]), blocked=frozenset(rng.sample(models, 2)))
            for i in range(6)
        ]
        ds = [d(m, rng.uniform(0, 5000), rng.randint(0, 100)) for m in models]
        plan = place(ws, ds, 0.0, P)
        assert all(plan[x.name] not in x.blocked for x in ws)


def test_much_higher_priority_takes_workers_from_a_lower_priority_model():
    ws = [w("a", "low"), w("b", "low")]
    plan = place(ws, [d("low", 10_000, priority=10), d("high", 10_000, priority=90)], 0.0, P)
    assert plan == {"a": "high", "b": "high"}  # even the last holder
    # a small gap does not preempt beyond the one holder every model gets
    plan = place(ws, [d("low", 10_000, priority=50), d("high", 10_000, priority=60)], 0.0, P)
    assert sorted(plan.values()) == ["high", "low"]
    # and a lower-priority newcomer never takes a higher-priority model's worker
    ws2 = [w("a", "high"), w("b", "high")]
    plan = place(ws2, [d("high", 10_000, priority=90), d("low", 10, priority=10)], 0.0, P)
    assert plan == {"a": "high", "b": "high"}


def test_priority_orders_who_is_covered_first():
    ws = [w("a", None)]
    ds = [d("old", 100, priority=50, oldest=0.0), d("new", 100, priority=50, oldest=5.0)]
    assert place(ws, ds, 10.0, P) == {"a": "old"}
    ds = [d("old", 100, priority=50, oldest=0.0), d("urgent", 100, priority=70, oldest=5.0)]
    assert place(ws, ds, 10.0, P) == {"a": "urgent"}


def test_deterministic_and_independent_of_input_order():
    rng = random.Random(3)
    models = [f"m{i}" for i in range(6)]
    ws = [
        w(
            f"w{i:02d}",
            rng.choice([*models, None]),
            ram=frozenset(rng.sample(models, 2)),
            disk=frozenset(rng.sample(models, 3)),
            assigned_at=rng.uniform(0, 100),
        )
        for i in range(20)
    ]
    ds = [
        d(m, rng.uniform(0, 20_000), rng.choice([10, 50, 90]), rng.uniform(0, 50)) for m in models
    ]
    first = place(ws, ds, 100.0, P)
    assert place(ws, ds, 100.0, P) == first
    for _ in range(5):
        rng.shuffle(ws)
        rng.shuffle(ds)
        assert place(ws, ds, 100.0, P) == first
    assert set(first) == {x.name for x in ws}
