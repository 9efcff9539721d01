"""The command line on the embedded stack: ``farm up`` then submit/status/cancel, and
``farm demo``; real processes (embedded Redis, API, scheduler, Flower, worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from farm.redis_server import free_port

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]


def farm_env(tmp: Path, ports: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    if ports:
        env.update(FARM_API_PORT=str(free_port()), FARM_FLOWER_PORT=str(free_port()))
    env.update(
        FARM_DATA_DIR=str(tmp / "data"),
        PYTHONPATH=str(ROOT),
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def farm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def start_farm_up(env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """``farm up`` on one CPU worker, once it says it is up; its output lines so far."""
    up = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "up", "--devices", "cpu:1"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert up.stdout is not None
    lines: list[str] = []
    for line in up.stdout:
        lines.append(line)
        if "farm is up" in line:
            return up, lines
    up.wait()
    pytest.fail("farm up ended early:\n" + "".join(lines))


def test_farm_up_serves_submit_status_cancel_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = farm_env(tmp_path)
    up, lines = start_farm_up(env)
    try:
        text = "".join(lines)
        api = f"http://127.0.0.1:{env['FARM_API_PORT']}"
        flower = f"http://127.0.0.1:{env['FARM_FLOWER_PORT']}"
        assert api in text and flower in text
        assert get(api + "/healthz")[0] == 200

        done = farm(env, "submit", "--prompt", "a cat", "--prompt", "a dog", "--count", "2",
                    "--width", "64", "--height", "64", "--steps", "4", "--wait")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        job_id = done.stdout.split()[1].rstrip(":")
        assert f"job {job_id} done: 4 done, 0 failed" in done.stdout

        status = farm(env, "status", job_id)
        assert json.loads(status.stdout)["done"] == 4
        listing = farm(env, "status")
        assert job_id in listing.stdout and "done" in listing.stdout
        models = farm(env, "models", "list")
        assert "demo-shapes" in models.stdout and "synthetic" in models.stdout

        big = farm(env, "submit", "--model", "synthetic", "--prompt", "x", "--count", "100000")
        big_id = big.stdout.split()[1].rstrip(":")
        assert "priority 80" in farm(env, "priority", big_id, "80").stdout
        assert f"job {big_id} paused" in farm(env, "pause", big_id).stdout
        resumed = farm(env, "resume", big_id).stdout
        assert f"job {big_id} running" in resumed or f"job {big_id} queued" in resumed
        cancelled = farm(env, "cancel", big_id)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout

        bad = farm(env, "submit", "--prompt", "x", "--width", "65")
        assert bad.returncode == 2 and "width" in bad.stderr

        # Flower sees the workers' task events
        deadline = time.monotonic() + 30
        while True:
            status_code, body = get(flower + "/metrics")
            if b'flower_events_total{task="farm.render"' in body or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status_code == 200 and b"farm.render" in body
    finally:
        up.send_signal(signal.SIGINT)
        try:
            rest, _ = up.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            rest, _ = up.communicate()
    assert up.returncode == 0, "".join(lines) + rest
    # everything it started is gone: nothing answers on the API port any more
    with pytest.raises(OSError):
        get(f"http://127.0.0.1:{env['FARM_API_PORT']}/healthz")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_farm_up_killed_outright_leaves_no_process_behind(tmp_path: Path) -> None:
    env = farm_env(tmp_path)
    up, _ = start_farm_up(env)
    # the server, API, scheduler, Flower, launcher and one worker (and its pool)
    deadline = time.monotonic() + 60
    while len(below := descendants(up.pid)) < 6 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(below) >= 6, below
    up.kill()
    up.wait()
    deadline = time.monotonic() + 60
    while (left := {p for p in below if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        assert not left, f"still running after farm up was killed: {sorted(left)}"
        with pytest.raises(OSError):
            get(f"http://127.0.0.1:{env['FARM_API_PORT']}/healthz")
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def test_farm_demo_runs_a_job_end_to_end(tmp_path: Path) -> None:
    env = farm_env(tmp_path, ports=False)  # the demo picks free ports itself
    out = farm(env, "demo", "--devices", "cpu:1", "--count", "2", timeout=500)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: 16 done, 0 failed" in out.stdout  # 8 prompts x 2 seeds
    pngs = list((tmp_path / "data" / "storage" / "demo").rglob("*.png"))
    assert len(pngs) == 16
    assert "16 images in" in out.stdout
    sheet = tmp_path / "data" / "demo" / "contact-sheet.png"
    assert f"contact sheet: {sheet}" in out.stdout
    with Image.open(sheet) as im:
        assert im.width > 2 * 64 and im.height > 8 * 64  # 2 seeds across, 8 prompts down
