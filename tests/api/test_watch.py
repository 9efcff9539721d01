"""``farm watch`` against a real API process on a real Redis server. No worker runs here:
the test plays one through the ledger (marking images done or failed) while the command
follows the jobs."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from farm.client import FarmClient
from farm.jobs import Ledger
from farm.redis_server import free_port
from farm.spec import JobSpec
from farm.watch import Watch, run
from farm.workers_registry import WorkerRegistry
from tests.servers import RedisServer, api_process

ROOT = Path(__file__).resolve().parents[2]


class Api:
    def __init__(self, url: str, ledger: Ledger, env: dict[str, str]):
        self.url, self.ledger, self.env = url, ledger, env

    def submit(self, n: int, **kw: object) -> str:
        spec = JobSpec(model="synthetic", prompt="x", count=n, **kw)  # type: ignore[arg-type]
        return self.ledger.create(spec, 2).id

    def watch(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "watch", "--interval", "0.1", *args],
            env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("watch")
    with RedisServer() as server:
        ns = "w" + uuid.uuid4().hex[:8]
        port = free_port()
        env = {**os.environ, "FARM_REDIS_URL": server.url, "FARM_API_PORT": str(port),
               "FARM_DATA_DIR": str(tmp), "FARM_NAMESPACE": ns,
               "FARM_API_URL": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}  # fmt: skip
        with api_process(env, port):
            yield Api(env["FARM_API_URL"], Ledger(redis.Redis.from_url(server.url), ns), env)


def play(ledger: Ledger, steps: list[tuple[str, list[int], bool]], pause: float = 0.3) -> None:
    """Claim and mark images as a worker would, one step every ``pause`` seconds."""
    for job, indices, ok in steps:
        time.sleep(pause)
        ledger.claim(job, indices[0] // 2, "w0")
        ledger.mark(job, indices, ok=ok)


def read_lines(proc: subprocess.Popen[str]) -> tuple[list[str], threading.Thread]:
    """The command's stdout lines as they come (a thread reads them)."""
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
    reader.start()
    return lines, reader


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_watch_follows_the_jobs_named_until_they_end(api: Api) -> None:
    good, bad = api.submit(4), api.submit(2)
    api.ledger.record_error(bad, 0, [0, 1], stage="render", worker="w0", model="synthetic",
                            error="OutOfMemoryError: CUDA out of memory",
                            images_failed=True)  # fmt: skip
    proc = api.watch(good, bad)
    lines, reader = read_lines(proc)
    wait_for(lambda: len(lines) >= 2, "the first bars")
    play(api.ledger, [(good, [0, 1], True), (good, [2, 3], True), (bad, [0, 1], False)])
    assert proc.wait(timeout=30) == 1  # one of the two ended failed
    reader.join()
    lines = [line.rstrip("\n") for line in lines]
    bars = [line for line in lines if line.startswith(good)]
    # a line each time its progress or state changed, never twice the same (the watch
    # may or may not look between the claim and the first images done)
    seen = [(b.split()[1], re.findall(r"\| (\d+/\d+)", b)[0]) for b in bars]
    assert seen[0] == ("queued", "0/4") and seen[-1] == ("running", "2/4")
    assert set(seen) <= {("queued", "0/4"), ("running", "0/4"), ("running", "2/4")}
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))
    assert f"job {good} done: 4 done, 0 failed" in lines
    at = lines.index(f"job {bad} failed: 0 done, 2 failed")
    assert lines[at + 1] == "  last error: render on w0: OutOfMemoryError: CUDA out of memory"

    proc = api.watch(good)  # a job already done: one line, at once, success
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.splitlines() == [f"job {good} done: 4 done, 0 failed"]

    proc = api.watch("0123456789abcdef")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "no job '0123456789abcdef'" in err
    proc = api.watch("--interval", "0", good)
    assert proc.wait(timeout=30) == 2
    assert "--interval must be above 0" in (proc.stderr.read() if proc.stderr else "")


def test_watch_without_jobs_follows_the_farm_until_idle(api: Api) -> None:
    first = api.submit(2)
    held = api.submit(2)
    api.ledger.pause(held)  # a paused job does not keep --until-idle waiting
    proc = api.watch("--until-idle")

    lines, reader = read_lines(proc)
    wait_for(lambda: any(line.startswith(held) for line in lines), "the first bars")
    later = api.submit(2)  # submitted after the watch began: it joins
    wait_for(lambda: any(line.startswith(later) for line in lines), "the new job's bar")
    play(api.ledger, [(first, [0, 1], True), (later, [0, 1], True)])
    assert proc.wait(timeout=30) == 0
    reader.join()
    lines = [line.rstrip("\n") for line in lines]
    assert f"job {first} done: 2 done, 0 failed" in lines
    assert f"job {later} done: 2 done, 0 failed" in lines
    assert any(line.startswith(f"{held} paused ") for line in lines)
    assert not any(line.startswith(f"job {held}") for line in lines)


def test_on_a_terminal_the_bars_are_redrawn_in_place(api: Api) -> None:
    jobs = [api.submit(2, priority=p) for p in (10, 90, 50)]
    out = io.StringIO()
    rounds = []

    def step(_: float) -> None:  # between two rounds: one job ends
        job = jobs[len(rounds)]
        rounds.append(out.getvalue())
        api.ledger.mark(job, [0, 1], ok=True)

    code = run(FarmClient(api.url), jobs, out=out, tty=True, sleep=step)
    assert code == 0 and len(rounds) == 3
    frames = out.getvalue().split("\x1b[")
    # the first frame draws three bars; each later one moves up over the bars it drew
    # last, clears them and draws the ended job's line and the bars still going
    first = frames[0].splitlines()
    assert [line.split()[0] for line in first] == [jobs[1], jobs[2], jobs[0]]  # priority
    assert frames[1].startswith("3F")
    assert frames[2].startswith("J" + f"job {jobs[0]} done: 2 done, 0 failed\n")
    assert [line.split()[0] for line in frames[2].splitlines()[1:]] == [jobs[1], jobs[2]]
    assert frames[3] == "2F" and frames[5] == "1F"
    assert frames[-1] == f"Jjob {jobs[2]} done: 2 done, 0 failed\n"


def test_the_farm_view_counts_every_unfinished_job_exactly(api: Api) -> None:
    """More unfinished jobs than bars: the lines under the bars count all of them, and give
    the running jobs' images/s and the live workers, from ``/v1/stats``."""
    jobs = [api.submit(4) for _ in range(4)]
    assert api.ledger.claim(jobs[0], 0, "w0") == "ok"
    api.ledger.mark(jobs[0], [0, 1])
    started = api.ledger.get(jobs[0]).started_at
    assert started is not None
    workers = WorkerRegistry(api.ledger.r, api.ledger.ns)
    workers.publish("n1-gpu0", {}, ttl=30)
    out = io.StringIO()

    def stop(_: float) -> None:
        raise KeyboardInterrupt

    t0 = time.time()
    try:
        assert run(FarmClient(api.url), [], most=2, out=out, tty=True, sleep=stop) == 0
    finally:
        t1 = time.time()
        workers.remove("n1-gpu0")
        for job in jobs:  # nothing left running for the other tests
            api.ledger.cancel(job)
    # the jobs earlier tests left unfinished are counted too
    unfinished = 4 + sum(len(api.ledger.list(1000, state=s)) for s in ("paused", "queued"))
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:2]] == [jobs[0], jobs[1]]  # running, queued
    assert lines[2] == f"... and {unfinished - 2} more"
    summary = re.fullmatch(r"(\d+) unfinished jobs, ([\d.]+) img/s, 1 workers live", lines[3])
    assert summary and int(summary[1]) == unfinished, lines
    assert 2 / (t1 - started) - 0.01 <= float(summary[2]) <= 2 / (t0 - started) + 0.01


def test_the_farm_view_counts_and_orders_what_it_shows() -> None:
    """Pure: which bars a poll leaves on screen, in what order, and the summary line."""

    def job(i: str, state: str, prio: int, created: float) -> dict[str, object]:
        return {"id": i, "state": state, "priority": prio, "created_at": created, "done": 1,
                "failed": 0, "total": 4, "images_per_s": 0.5, "eta_s": 6.0}  # fmt: skip

    w = Watch(follow_all=True, workers=3)
    ended = w.update([job("p", "paused", 99, 1), job("q", "queued", 5, 2),
                      job("r", "running", 1, 3), job("s", "running", 1, 2),
                      job("d", "done", 1, 0)])  # fmt: skip
    assert ended == ["job d done: 1 done, 0 failed"]
    block = w.block(100, most=3)
    assert [line.split()[0] for line in block[:3]] == ["s", "r", "q"]
    assert block[3:] == ["... and 1 more", "4 unfinished jobs, 2.00 img/s, 3 workers live"]
    assert not w.finished() and not w.finished(idle=True)
    assert w.update([job("d", "done", 1, 0)]) == []  # an ended job is told once
    w.update([job("q", "cancelled", 5, 2), job("r", "done", 1, 3), job("s", "done", 1, 2)])
    assert w.finished(idle=True) and not w.finished() and not w.ok()  # q was cancelled
