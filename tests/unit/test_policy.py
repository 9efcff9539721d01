"""Release policy (pure): shallow queue, priority order, fair share among equals."""

from scheduler.policy import JobView, capacity, plan_releases


def job(id, priority=50, created=0.0, outstanding=0, remaining=100):
    return JobView(id, priority, created, outstanding, remaining)


def test_never_more_than_capacity_outstanding():
    jobs = [job("a", outstanding=3), job("b", outstanding=2)]
    assert plan_releases(jobs, 8) == [("a", 1), ("b", 2)]
    assert plan_releases(jobs, 5) == []


def test_higher_priority_takes_the_free_slots_first():
    jobs = [job("low", 10, created=0), job("high", 90, created=5, remaining=3)]
    assert plan_releases(jobs, 6) == [("high", 3), ("low", 3)]


def test_equal_priority_shares_fairly():
    jobs = [job("old", created=0, outstanding=2), job("new", created=1)]
    assert dict(plan_releases(jobs, 8)) == {"old": 2, "new": 4}


def test_jobs_without_remaining_tasks_get_nothing():
    jobs = [job("done", remaining=0, outstanding=1), job("b", remaining=1)]
    assert plan_releases(jobs, 10) == [("b", 1)]


def test_capacity_is_shallow_but_never_zero():
    assert capacity(0, 4) == 4
    assert capacity(3, 2) == 6
    assert capacity(1, 1) == 2


def test_a_higher_broker_class_is_not_blocked_by_lower_outstanding_tasks():
    low = JobView("low", 10, 0.0, outstanding=6, remaining=50, level=1)
    high = JobView("high", 90, 5.0, outstanding=0, remaining=3, level=8)
    assert plan_releases([low, high], 6) == [("high", 3)]
    # but within one class the cap holds
    same = JobView("same", 10, 5.0, outstanding=0, remaining=3, level=1)
    assert plan_releases([low, same], 6) == []
