"""Child processes that do not outlive the process that started them.

``farm up`` starts a Redis-compatible server, the API, the scheduler, Flower and the
worker launcher, which starts one worker per device. Stopped normally, each parent stops
its children. Killed outright (SIGKILL, the OOM killer), a parent cannot, and its children
would keep the ports, the GPUs and the broker connection. On Linux every child asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and so shuts down cleanly
on its own; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up before any fork: the child only calls it


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when the thread
    that starts it exits (spawn from the main thread). ``None`` where unsupported."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), int(sig))

    return preexec
