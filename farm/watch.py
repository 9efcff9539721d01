"""``farm watch``: progress bars of jobs, read from the API, until they end.

Given job ids it follows those; given none it follows the farm: every unfinished job
(queued, running, paused) has a bar, jobs submitted later join, and a job that ends
leaves its bar for one closing line. On a terminal the bars are redrawn in place; into
a pipe or a log each job prints a line only when its progress or state changes.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from farm.client import FarmClient

UNFINISHED = ("running", "queued", "paused")
ENDED = ("done", "failed", "cancelled")


def job_line(job: dict[str, Any], width: int) -> str:
    """One job as a progress bar: id, state, bar, counts, images/s, ETA."""
    from tqdm import tqdm

    eta = job.get("eta_s")
    failed = f", {job['failed']} failed" if job["failed"] else ""
    eta_text = "-" if eta is None else f"{eta:.0f}s"
    rest = f"{failed}, {job['images_per_s']:.2f} img/s, eta {eta_text}"
    return tqdm.format_meter(
        n=job["done"] + job["failed"],
        total=job["total"],
        elapsed=0,
        ncols=max(width, 60),
        prefix=f"{job['id']} {job['state']:<9}",
        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}" + rest,
    )


def end_line(job: dict[str, Any]) -> str:
    line = f"job {job['id']} {job['state']}: {job['done']} done, {job['failed']} failed"
    err = job.get("last_error")
    if job["state"] != "done" and err:
        line += f"\n  last error: {err['stage']} on {err['worker']}: {err['error']}"
    return line


@dataclass
class Watch:
    """What is on screen: the jobs followed, their last figures, and those that ended.

    ``update`` takes one poll's answers and returns the lines to print for good (a job
    that ended); ``block`` is what the bars show now."""

    follow_all: bool
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ended: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 0
    unfinished: int | None = None  # the farm's unfinished jobs (/v1/stats); None: those polled
    rate: float | None = None  # the running jobs' images/s (/v1/stats); None: from those polled

    def update(self, polled: Iterable[dict[str, Any]]) -> list[str]:
        out = []
        for job in polled:
            if job["id"] in self.ended:
                continue
            if job["state"] in ENDED:
                self.jobs.pop(job["id"], None)
                self.ended[job["id"]] = job
                out.append(end_line(job))
            else:
                self.jobs[job["id"]] = job
        return out

    def finished(self, idle: bool = False) -> bool:
        """No job followed is unfinished; ``idle``: none is queued or running (a paused
        job waits for someone to resume it)."""
        if idle:
            return all(j["state"] == "paused" for j in self.jobs.values())
        return not self.jobs

    def block(self, width: int, most: int) -> list[str]:
        shown = sorted(self.jobs.values(), key=_order)
        lines = [job_line(j, width) for j in shown[:most]]
        # the farm's count can lag the jobs polled after it by a job or two
        n = max(len(shown), self.unfinished or 0)
        if n > most:
            lines.append(f"... and {n - most} more")
        if self.follow_all:
            rate = sum(j["images_per_s"] for j in shown) if self.rate is None else self.rate
            lines.append(f"{n} unfinished jobs, {rate:.2f} img/s, {self.workers} workers live")
        return lines

    def ok(self) -> bool:
        return all(j["state"] == "done" for j in self.ended.values())


def _order(job: dict[str, Any]) -> tuple[int, int, float]:
    """Running jobs first, then queued, then paused; higher priority, then older, first."""
    return (UNFINISHED.index(job["state"]), -job["priority"], job["created_at"] or 0.0)


def poll(client: FarmClient, watch: Watch, ids: list[str], page: int) -> list[dict[str, Any]]:
    """The jobs to show this round: the ids asked for, or every unfinished job (and the
    ones followed so far, to see them end)."""
    if not watch.follow_all:
        return [client.job(j) for j in ids if j not in watch.ended]
    stats = client.stats()  # the counts, exact; the jobs are listed only for their bars
    watch.unfinished = sum(stats["jobs"][s] for s in UNFINISHED)
    watch.rate = stats["images_per_s"]
    watch.workers = stats["workers"]
    seen: dict[str, dict[str, Any]] = {}
    for state in UNFINISHED:
        if not stats["jobs"][state]:  # none to list (one that came since joins next round)
            continue
        for job in client.jobs(page, state=state):
            seen[job["id"]] = job
    for job_id in watch.jobs:
        if job_id not in seen:  # it left the unfinished states since the last round
            seen[job_id] = client.job(job_id)
    return list(seen.values())


def run(
    client: FarmClient,
    ids: list[str],
    *,
    interval: float = 1.0,
    until_idle: bool = False,
    most: int = 20,
    out: TextIO = sys.stdout,
    tty: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Follow ``ids`` (or the whole farm) until they end; 0 when every job that ended
    ended done, 1 otherwise. Following the farm ends only with ``until_idle`` (when no job
    is queued or running) or Ctrl-C."""
    tty = out.isatty() if tty is None else tty
    watch = Watch(follow_all=not ids)
    drawn = 0
    last: dict[str, tuple[Any, ...]] = {}
    try:
        while True:
            polled = poll(client, watch, ids, most + 1)
            ended = watch.update(polled)
            width = shutil.get_terminal_size((100, 20)).columns - 1
            if tty:
                if drawn:
                    out.write(f"\x1b[{drawn}F\x1b[J")
                lines = watch.block(width, most)
                out.write("".join(line + "\n" for line in ended + lines))
                drawn = len(lines)
            else:
                for line in ended:
                    out.write(line + "\n")
                for job in watch.jobs.values():
                    now = (job["state"], job["done"], job["failed"])
                    if last.get(job["id"]) != now:
                        last[job["id"]] = now
                        out.write(job_line(job, width) + "\n")
            out.flush()
            if ids and watch.finished() or not ids and until_idle and watch.finished(idle=True):
                return 0 if watch.ok() else 1
            sleep(interval)
    except KeyboardInterrupt:  # the jobs go on; only the watching stops
        return 0 if watch.follow_all and not until_idle else 130
