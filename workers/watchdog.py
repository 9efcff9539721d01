"""Hang detection for one worker process.

A worker whose render hangs (a GPU driver hang, a deadlock, a read from a storage mount
that never returns) keeps heartbeating from its other threads, so the scheduler sees it
alive and its task waits for the broker's visibility timeout (an hour) while the GPU sits
idle. The work a worker does goes through stages (loading a model, rendering a batch,
storing an image); each stage ticks at every step it completes (a sampler step, a piece
of a download). A stage that goes ``limit_s`` seconds without a tick is stalled:
the runtime then ends the process (see ``Runtime.on_stall``) so that its task goes to
another worker and the launcher starts a fresh process on the device.

Pure except for the clock, which tests replace.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Stall:
    what: str  # the stage, e.g. "rendering job/3"
    model: str | None  # the model the stage works with, if any
    seconds: float  # since its last tick
    thread: int  # ident of the thread stuck in it


@dataclass(eq=False)  # a stage is itself, whatever its fields
class _Stage:
    what: str
    model: str | None
    last: float


class Watchdog:
    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """``limit_s`` <= 0 turns detection off (stages are still tracked)."""
        self.limit_s = limit_s
        self.clock = clock
        self._lock = threading.Lock()
        # per thread, its stages, innermost last
        self._stages: dict[int, list[_Stage]] = {}

    @contextlib.contextmanager
    def stage(self, what: str, model: str | None = None) -> Iterator[Callable[..., None]]:
        """Mark the calling thread busy with ``what`` until the block ends; yields the
        stage's tick. Stages nest: a tick counts for the thread's outer stages too. The
        tick takes and ignores any arguments, so it serves as any progress callback (bytes
        copied, step number), and may be called from any thread (a download's)."""
        me = threading.get_ident()
        entry = _Stage(what, model, self.clock())
        with self._lock:
            self._stages.setdefault(me, []).append(entry)
        try:
            yield lambda *_: self._tick(me)
        finally:
            with self._lock:
                stack = self._stages.get(me, [])
                if entry in stack:
                    stack.remove(entry)
                if not stack:
                    self._stages.pop(me, None)

    def tick_here(self, *_: object, **__: object) -> None:
        """The calling thread's stages made progress (for hooks that run in the thread
        doing the work, such as a storage client's before each attempt)."""
        self._tick(threading.get_ident())

    def _tick(self, thread: int) -> None:
        now = self.clock()
        with self._lock:
            for s in self._stages.get(thread, ()):
                s.last = now

    def busy(self) -> list[str]:
        """The stages under way, outermost first, every thread."""
        with self._lock:
            return [s.what for stack in self._stages.values() for s in stack]

    def stalled(self) -> Stall | None:
        """The innermost stage that has gone longest without a tick, if that is
        ``limit_s`` or more; None otherwise or when detection is off."""
        if self.limit_s <= 0:
            return None
        now = self.clock()
        worst: Stall | None = None
        with self._lock:
            for thread, stack in self._stages.items():
                inner = stack[-1]
                idle = now - inner.last
                if idle >= self.limit_s and (worst is None or idle > worst.seconds):
                    model = next((s.model for s in reversed(stack) if s.model), None)
                    worst = Stall(inner.what, model, idle, thread)
        return worst
