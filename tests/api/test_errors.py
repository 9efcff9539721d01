"""A job's failure list against a real Redis server: what the workers and the scheduler
record through ``Ledger.record_error``, read back by the API (``/v1/jobs/<id>/errors``,
``last_error``) and the CLI (``farm errors``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from farm import cli
from farm.config import Config
from farm.jobs import ERROR_CHARS, ERRORS_KEPT, Ledger
from tests.servers import RedisServer, api_process, free_port

Submit = Callable[..., dict[str, Any]]


def record(led: Ledger, job: str, n: int, **kw: Any) -> bool:
    fields = {
        "stage": "render",
        "error": f"RuntimeError: failure {n}",
        "worker": f"w{n % 3}",
        "model": "synthetic",
        "images_failed": True,
        **kw,
    }
    return led.record_error(job, n % 4, [2 * (n % 4), 2 * (n % 4) + 1], **fields)


def test_a_job_tells_its_failures_newest_first(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    job = submit(count=8, batch_size=2)["id"]
    fresh = client.get(f"/v1/jobs/{job}").json()
    assert (fresh["errors"], fresh["last_error"]) == (0, None)
    assert client.get(f"/v1/jobs/{job}/errors").json() == {
        "job": job, "errors": [], "total": 0, "next_offset": None
    }  # fmt: skip

    before = time.time()
    for n in range(3):
        assert record(led, job, n)
    got = client.get(f"/v1/jobs/{job}").json()
    assert got["errors"] == 3 and got["failed"] == 0  # recorded only; nothing marked
    last = got["last_error"]
    assert last["error"] == "RuntimeError: failure 2" and last["stage"] == "render"
    assert (last["task"], last["images"], last["worker"]) == (2, [4, 5], "w2")
    assert before <= last["at"] <= time.time()
    page = client.get(f"/v1/jobs/{job}/errors", params={"limit": 2}).json()
    assert [e["error"][-1] for e in page["errors"]] == ["2", "1"]
    assert (page["total"], page["next_offset"]) == (3, 2)
    page = client.get(f"/v1/jobs/{job}/errors", params={"offset": 2, "limit": 2}).json()
    assert [e["error"][-1] for e in page["errors"]] == ["0"]
    assert page["next_offset"] is None
    listed = client.get("/v1/jobs").json()
    assert [j["errors"] for j in listed if j["id"] == job] == [3]


def test_the_last_failures_are_kept_and_all_are_counted(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    job = submit(count=8, batch_size=2)["id"]
    for n in range(ERRORS_KEPT + 5):
        record(led, job, n, error="x" * (ERROR_CHARS + 50) if n == 7 else f"E: {n}")
    page = client.get(f"/v1/jobs/{job}/errors", params={"limit": ERRORS_KEPT}).json()
    assert page["total"] == ERRORS_KEPT + 5 and page["next_offset"] is None
    kept = [e["error"] for e in page["errors"]]
    assert kept[0] == f"E: {ERRORS_KEPT + 4}" and kept[-1] == "E: 5"  # the oldest dropped
    assert redis_client.llen(led.job_key(job, "errors")) == ERRORS_KEPT
    led.record_error(job, 0, [0], stage="load", error="y" * (ERROR_CHARS + 50),
                     worker="w0", model="m", images_failed=False)  # fmt: skip
    assert len(led.errors(job, limit=1)[0]["error"]) == ERROR_CHARS


def test_bad_paging_names_the_field_and_an_unknown_job_is_404(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    job = submit()["id"]
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": ERRORS_KEPT + 1}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"offset": -1}, "offset"),
    ):
        r = client.get(f"/v1/jobs/{job}/errors", params=params)
        assert r.status_code == 422, r.text
        assert [d["field"] for d in r.json()["detail"]] == [field]
    assert client.get("/v1/jobs/0123456789abcdef/errors").status_code == 404
    assert client.get("/v1/jobs/not..an..id/errors").status_code == 404
    led = Ledger(redis_client, config.namespace)
    # nothing is recorded for a job that does not exist, and no stray job hash appears
    assert not record(led, "0123456789abcdef", 1)
    assert not redis_client.exists(led.job_key("0123456789abcdef"))
    assert client.get("/v1/jobs").status_code == 200
    with pytest.raises(ValueError, match="stage must be one of"):
        record(led, job, 1, stage="exploded")


def test_farm_errors_prints_the_failure_list(
    submit: Submit,
    redis_client: redis.Redis,
    redis_server: RedisServer,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    led = Ledger(redis_client, config.namespace)
    job = submit(count=8, batch_size=2)["id"]
    led.record_error(job, 1, [2, 3], stage="lost", worker="w1", model="synthetic",
                     error="worker process w1#ab died or hung holding the task (1 of "
                     "FARM_TASK_LOSSES=3); the task goes to another worker",
                     images_failed=False)  # fmt: skip
    record(led, job, 3, stage="load", error="StorageError: no blob models/ab")
    led.record_error(job, None, [], stage="hang", worker="w2", model="synthetic",
                     error="no progress for 301 s while loading model synthetic",
                     images_failed=False)  # fmt: skip
    port = free_port()
    env = {**os.environ, "FARM_REDIS_URL": redis_server.url, "FARM_API_PORT": str(port),
           "FARM_DATA_DIR": str(tmp_path), "FARM_NAMESPACE": config.namespace}  # fmt: skip
    with api_process(env, port) as url:
        monkeypatch.setenv("FARM_API_URL", url)
        assert cli.main(["errors", job]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"job {job}: 3 failures recorded, the last 3 shown"
        assert "ahead of its tasks  hang on w2 [synthetic]: no progress for 301 s" in lines[1]
        assert "task 3 (images 6..7, failed)  load on w0 [synthetic]: StorageError" in lines[2]
        assert "task 1 (images 2..3, sent again)  lost on w1 [synthetic]: worker" in lines[3]
        assert cli.main(["errors", job, "--limit", "1"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2
        assert cli.main(["errors", "0123456789abcdef"]) == 2
        assert "no job" in capsys.readouterr().err

        def fail_the_next_job() -> None:  # no worker runs here: the test plays one
            deadline = time.monotonic() + 30
            while (new := led.list(limit=1)[0].id) == job:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            led.record_error(new, 0, [0, 1], stage="render", worker="w0", model="synthetic",
                             error="OutOfMemoryError: CUDA out of memory",
                             images_failed=True)  # fmt: skip
            led.mark(new, [0, 1], ok=False)

        player = threading.Thread(target=fail_the_next_job)
        player.start()
        code = cli.main(["submit", "--model", "synthetic", "--prompt", "x", "--count", "2",
                         "--batch-size", "2", "--wait"])  # fmt: skip
        player.join()
        out = capsys.readouterr().out
        assert code == 1 and "failed: 0 done, 2 failed" in out
        assert "last error: " in out and "render on w0 [synthetic]: OutOfMemoryError" in out
        assert cli.main(["errors", job, "--limit", "500"]) == 2
        assert "limit" in capsys.readouterr().err
