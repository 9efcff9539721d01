"""A worker's write of one image while the store is away: pure retry logic, fake writes."""

from __future__ import annotations

import threading
import time

import pytest

from storage.base import StorageError
from workers.render import StoreAway, put_waiting


class Writes:
    """A write that fails with the given errors in turn, then succeeds."""

    def __init__(self, *errors: StorageError) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


AWAY = StorageError("connection refused", transient=True)


def test_a_store_that_comes_back_takes_the_image() -> None:
    put = Writes(AWAY, AWAY)
    t0 = time.monotonic()
    put_waiting(put, 60.0, threading.Event())
    assert put.calls == 3
    assert 1.4 < time.monotonic() - t0 < 3  # waited 0.5 s, then 1 s


def test_an_error_that_cannot_clear_up_stands_at_once() -> None:
    put = Writes(StorageError("access denied"))
    with pytest.raises(StorageError, match="access denied"):
        put_waiting(put, 60.0, threading.Event())
    assert put.calls == 1


def test_a_store_away_longer_than_the_limit_fails_the_write() -> None:
    put = Writes(*[AWAY] * 100)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="connection refused"):
        put_waiting(put, 2.0, threading.Event())
    assert 2 <= put.calls <= 3 and time.monotonic() - t0 < 2.5
    put = Writes(AWAY)
    with pytest.raises(StorageError):
        put_waiting(put, 0.0, threading.Event())  # no wait at all
    assert put.calls == 1


def test_a_worker_that_begins_to_stop_leaves_the_write() -> None:
    put, stopping = Writes(*[AWAY] * 100), threading.Event()
    threading.Timer(0.3, stopping.set).start()
    t0 = time.monotonic()
    with pytest.raises(StoreAway):
        put_waiting(put, 300.0, stopping)
    assert time.monotonic() - t0 < 1.5
