"""The watchdog's bookkeeping, on a clock the test moves."""

from __future__ import annotations

import threading

import pytest

from workers.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_stage_that_ticks_is_not_stalled_and_one_that_stops_ticking_is(clock: Clock) -> None:
    dog = Watchdog(10.0, clock)
    with dog.stage("rendering task j/0", "m0") as tick:
        for _ in range(5):  # 25 s in all, never 10 s without a tick
            clock.now += 5
            tick()
            assert dog.stalled() is None
        clock.now += 9.9
        assert dog.stalled() is None
        clock.now += 0.1
        stall = dog.stalled()
        assert stall is not None
        assert (stall.what, stall.model, stall.seconds) == ("rendering task j/0", "m0", 10.0)
        assert stall.thread == threading.get_ident()
    assert dog.stalled() is None and dog.busy() == []  # over: nothing to watch


def test_no_stage_no_stall_and_a_limit_of_zero_watches_nothing(clock: Clock) -> None:
    dog = Watchdog(10.0, clock)
    clock.now += 1e6
    assert dog.stalled() is None
    off = Watchdog(0, clock)
    with off.stage("loading model m0", "m0"):
        clock.now += 1e6
        assert off.stalled() is None
        assert off.busy() == ["loading model m0"]


def test_nested_stages_report_the_inner_one_with_the_outer_model(clock: Clock) -> None:
    dog = Watchdog(10.0, clock)
    with dog.stage("rendering task j/1", "m1") as outer:
        clock.now += 8
        with dog.stage("storing renders/j/1.png") as inner:
            assert dog.busy() == ["rendering task j/1", "storing renders/j/1.png"]
            clock.now += 8
            inner()  # counts for the outer stage as well
            clock.now += 8
            assert dog.stalled() is None
            clock.now += 2
            stall = dog.stalled()
            assert stall is not None
            assert (stall.what, stall.model) == ("storing renders/j/1.png", "m1")
        # the inner stage ended; the outer one ticked with it 10 s ago
        assert dog.stalled() is not None and dog.stalled().what == "rendering task j/1"
        outer()
        assert dog.stalled() is None


def test_stages_of_equal_names_are_kept_apart(clock: Clock) -> None:
    dog = Watchdog(10.0, clock)
    with dog.stage("storing k"):
        with dog.stage("storing k"):
            pass
        assert dog.busy() == ["storing k"]
    assert dog.busy() == []


def test_a_tick_from_another_thread_counts_for_the_stage_it_belongs_to(clock: Clock) -> None:
    """A download's progress callback runs on the transfer's own threads."""
    dog = Watchdog(10.0, clock)
    with dog.stage("loading model m2", "m2") as tick:
        clock.now += 9
        t = threading.Thread(target=tick, args=(8 * 1024 * 1024,))
        t.start()
        t.join()
        clock.now += 9
        assert dog.stalled() is None
        clock.now += 1
        assert dog.stalled() is not None


def test_the_thread_stuck_longest_is_reported(clock: Clock) -> None:
    dog = Watchdog(10.0, clock)
    entered = threading.Barrier(2)
    leave = threading.Event()

    def other() -> None:
        with dog.stage("loading model m3", "m3"):
            entered.wait()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    entered.wait()
    clock.now += 5
    with dog.stage("rendering task j/2", "m0"):
        clock.now += 11  # both past the limit: m3's load for 16 s, the render for 11 s
        stall = dog.stalled()
        assert stall is not None and (stall.what, stall.seconds) == ("loading model m3", 16)
        assert stall.thread == t.ident
    leave.set()
    t.join()
