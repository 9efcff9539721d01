"""A worker's runtime as ``workers.render._render_images`` uses it, for tests of the
render task without servers: the engine given, a local store, and a ledger that records
what it is told."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from storage import LocalStore
from workers.runtime import Stats
from workers.watchdog import Watchdog


class Ledger:
    """What _render_images tells the ledger, recorded."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []
        self.marked: list[tuple[list[int], bool]] = []

    def record_error(self, job_id: str, task_no: int, indices: list[int], **kw: Any) -> None:
        self.errors.append({"images": indices, **kw})

    def mark(self, job_id: str, indices: list[int], ok: bool) -> None:
        self.marked.append((indices, ok))


def runtime(tmp_path, engine: Any) -> SimpleNamespace:
    return SimpleNamespace(
        name="w1",
        engine_for=lambda model: engine,
        store=LocalStore(tmp_path / "store"),
        config=SimpleNamespace(storage_wait=0.5),
        stopping=threading.Event(),
        watchdog=Watchdog(0),
        ledger=Ledger(),
        stats=Stats(),
        failures=[],
        record_failure=lambda model: None,
        current_task="job/0",
        engine_model=None,
    )
