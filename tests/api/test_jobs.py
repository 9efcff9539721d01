"""Job endpoints against a real Redis server: submit, get, list, cancel, images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient

from farm.config import Config
from farm.jobs import TERMINAL, Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.spec import MAX_SEED
from storage import LocalStore
from storage.keys import image_key

Submit = Callable[..., dict[str, Any]]


def ledger(client: redis.Redis, config: Config) -> Ledger:
    return Ledger(client, config.namespace)


def test_submit_returns_201_with_summary(submit: Submit) -> None:
    job = submit(prompt=["a", "b", "c"], count=3, seed=7)
    assert job["state"] == "queued"
    assert job["total"] == 9
    assert job["tasks"] == 3  # default_batch_size 4 over 9 images in one cell
    assert job["seed"] == 7
    assert job["done"] == 0 and job["failed"] == 0
    assert job["spec"]["prompt"] == ["a", "b", "c"]
    assert job["batch_size"] == 4
    assert len(job["id"]) == 16


def test_submit_random_seed_is_recorded(submit: Submit, client: TestClient) -> None:
    job = submit(seed=-1)
    assert 0 <= job["seed"] <= MAX_SEED
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["seed"] == job["seed"] == again["spec"]["seed"]


def test_submit_sweep_counts_cells(submit: Submit) -> None:
    job = submit(count=2, batch_size=3, sweep={"width": [256, 512], "cfg_scale": [1, 5, 9]})
    assert job["total"] == 2 * 3 * 2
    assert job["tasks"] == 6  # one task per cell: 2 images, batch 3


def test_get_job_includes_spec(submit: Submit, client: TestClient) -> None:
    job = submit(tags=["nightly"], negative_prompt="blurry", width=256)
    r = client.get(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == job["id"]
    assert body["tags"] == ["nightly"]
    assert body["spec"]["negative_prompt"] == "blurry"
    assert body["spec"]["width"] == 256
    assert body["spec"]["model"] == "synthetic"


def test_get_unknown_job_is_404(client: TestClient) -> None:
    for job_id in ("0123456789abcdef", "..", "x" * 200, "%F0%9F%A6%8A", "a%00b"):
        r = client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 404, (job_id, r.text)
        assert isinstance(r.json()["detail"], str)


def test_list_newest_first_with_paging(submit: Submit, client: TestClient) -> None:
    ids = [submit(prompt=f"p{i}")["id"] for i in range(5)]
    r = client.get("/v1/jobs")
    assert r.status_code == 200
    assert [j["id"] for j in r.json()] == ids[::-1]
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 1}).json()
    assert [j["id"] for j in page] == ids[::-1][1:3]


def test_list_filters_by_state(submit: Submit, client: TestClient) -> None:
    a, b, c = (submit()["id"] for _ in range(3))
    assert client.post(f"/v1/jobs/{b}/cancel").status_code == 200
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled] == [b]
    queued = client.get("/v1/jobs", params={"state": "queued"}).json()
    assert [j["id"] for j in queued] == [c, a]
    assert client.get("/v1/jobs", params={"state": ""}).status_code == 200


def test_list_by_state_pages_through_chunks(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    led = ledger(redis_client, config)
    ids = [submit()["id"] for _ in range(11)]
    for i in (1, 2, 4, 7, 8, 10):
        assert led.cancel(ids[i]) == "ok"
    assert led.pause(ids[5]) == "ok"
    newest_first = [j.id for j in led.list(limit=100)]
    assert newest_first == ids[::-1]
    for state in ("queued", "cancelled", "paused", "done"):
        want = [j.id for j in led.list(limit=100) if j.state == state]
        for offset, limit in ((0, 100), (0, 2), (1, 3), (3, 2), (5, 5)):
            got = [j.id for j in led.list(limit=limit, offset=offset, state=state, chunk=2)]
            assert got == want[offset : offset + limit], (state, offset, limit)
    assert [j.id for j in led.list(state="queued", chunk=1)] == [ids[i] for i in (9, 6, 3, 0)]


def test_ended_jobs_are_listed_from_their_index_and_follow_a_retry(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    led = ledger(redis_client, config)
    ids = [submit(count=1, batch_size=1)["id"] for _ in range(6)]
    led.mark(ids[0], [0])
    led.mark(ids[1], [0], ok=False)
    assert led.cancel(ids[2]) == "ok"
    led.mark(ids[3], [0])
    led.mark(ids[4], [0], ok=False)

    def listed(state: str, lister: Ledger = led, **kw: int) -> list[str]:
        return [j.id for j in lister.list(state=state, **kw)]

    def indexed(state: str) -> list[str]:
        return [i.decode() for i in redis_client.zrevrange(led.ended_key(state), 0, -1)]

    assert listed("done") == indexed("done") == [ids[3], ids[0]]
    assert listed("failed") == indexed("failed") == [ids[4], ids[1]]
    assert listed("cancelled") == indexed("cancelled") == [ids[2]]
    assert listed("done", limit=1, offset=1) == [ids[0]]
    assert listed("done", offset=2) == []
    assert led.retry_failed(ids[1]) == ("running", 1)  # back among the unfinished
    assert listed("failed") == indexed("failed") == [ids[4]]
    assert listed("running") == [ids[1]]
    led.mark(ids[1], [0])
    assert listed("done") == indexed("done") == [ids[3], ids[1], ids[0]]
    assert listed("queued") == [ids[5]]
    # a namespace whose jobs ended before the scripts kept the index: it is built at the
    # first listing of an ended state, a chunk of jobs at a time
    redis_client.delete(*(led.ended_key(s) for s in TERMINAL), led.key("ended", "indexed"))
    before = Ledger(redis_client, config.namespace)
    before.index_ended(chunk=2)
    assert indexed("done") == [ids[3], ids[1], ids[0]]
    assert listed("done", before) == [ids[3], ids[1], ids[0]]
    assert listed("failed", before) == [ids[4]]
    assert listed("cancelled", before) == [ids[2]]
    assert redis_client.exists(led.key("ended", "indexed"))


def test_list_rejects_bad_state_and_paging(client: TestClient) -> None:
    r = client.get("/v1/jobs", params={"state": "sleeping"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "state"
    assert "queued" in r.json()["detail"][0]["msg"]
    for params, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"limit": "many"}, "limit"),
    ):
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 422, params
        assert [d["field"] for d in r.json()["detail"]] == [field]


def test_cancel_twice_is_fine(submit: Submit, client: TestClient) -> None:
    job = submit()
    for _ in range(2):
        r = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "cancelled"
        assert r.json()["finished_at"] is not None


def test_cancel_finished_job_is_409(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    job = submit(count=2)
    ledger(redis_client, config).mark(job["id"], [0, 1])
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    assert "done" in r.json()["detail"]
    failed = submit()
    ledger(redis_client, config).mark(failed["id"], [0], ok=False)
    r = client.post(f"/v1/jobs/{failed['id']}/cancel")
    assert r.status_code == 409
    assert "failed" in r.json()["detail"]


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert client.post("/v1/jobs/ffffffffffffffff/cancel").status_code == 404


def test_images_lists_done_images_only(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config, store: LocalStore
) -> None:
    job = submit(prompt=["cat", "dog"], count=3, seed=100)
    ledger(redis_client, config).mark(job["id"], [0, 2, 4, 5])
    r = client.get(f"/v1/jobs/{job['id']}/images")
    assert r.status_code == 200
    body = r.json()
    assert body["job"] == job["id"]
    assert body["next_offset"] is None
    got = [(i["index"], i["seed"], i["prompt"]) for i in body["images"]]
    # image k: prompt k // count, seed = job seed + k % count
    assert got == [(0, 100, "cat"), (2, 102, "cat"), (4, 101, "dog"), (5, 102, "dog")]
    for image in body["images"]:
        key = image_key("renders", job["id"], image["index"], image["seed"])
        assert image["key"] == key
        assert image["url"] == store.url(key)
        assert image["url"].startswith("file://")


def test_images_paging_and_prefix(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    job = submit(count=10, seed=5, output_prefix="team/run-1")
    ledger(redis_client, config).mark(job["id"], list(range(1, 10, 2)))
    url = f"/v1/jobs/{job['id']}/images"
    first = client.get(url, params={"limit": 2}).json()
    assert [i["index"] for i in first["images"]] == [1, 3]
    assert first["next_offset"] == 2
    assert first["images"][0]["key"] == f"team/run-1/{job['id']}/000001-6.png"
    rest = client.get(url, params={"offset": 2, "limit": 3}).json()
    assert [i["index"] for i in rest["images"]] == [5, 7, 9]
    assert rest["next_offset"] == 5
    assert client.get(url, params={"offset": 5}).json() == {
        "job": job["id"],
        "images": [],
        "next_offset": None,
    }
    r = client.get(url, params={"limit": 1001})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "limit"
    assert client.get("/v1/jobs/ffffffffffffffff/images").status_code == 404


def test_unknown_model_names_the_field(
    client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    r = client.post("/v1/jobs", json={"model": "no-such-model", "prompt": "x"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "model"
    assert "no-such-model" in r.json()["detail"][0]["msg"]
    ModelRegistry(redis_client, config.namespace).add(
        ModelEntry(name="sd15", engine="sd1", sha256="0" * 64)
    )
    ok = client.post("/v1/jobs", json={"model": "sd15", "prompt": "x"})
    assert ok.status_code == 201, ok.text
    r = client.post(
        "/v1/jobs",
        json={"model": "synthetic", "prompt": "x", "sweep": {"model": ["sd15", "ghost"]}},
    )
    assert r.status_code == 422
    assert r.json()["detail"] == [{"field": "sweep.model[1]", "msg": r.json()["detail"][0]["msg"]}]
    assert "ghost" in r.json()["detail"][0]["msg"]


def test_pause_and_resume(submit: Submit, client: TestClient) -> None:
    job = submit(count=4)
    r = client.post(f"/v1/jobs/{job['id']}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert client.post(f"/v1/jobs/{job['id']}/pause").status_code == 200  # idempotent
    r = client.post(f"/v1/jobs/{job['id']}/resume")
    assert r.status_code == 200 and r.json()["state"] == "queued"  # no task started yet
    assert client.post(f"/v1/jobs/{job['id']}/resume").status_code == 200  # idempotent
    client.post(f"/v1/jobs/{job['id']}/cancel")
    r = client.post(f"/v1/jobs/{job['id']}/resume")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_pause_of_a_finished_job_is_409(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    job = submit(count=1)
    ledger(redis_client, config).mark(job["id"], [0])
    r = client.post(f"/v1/jobs/{job['id']}/pause")
    assert r.status_code == 409 and "done" in r.json()["detail"]


def test_priority_changes_while_queued(submit: Submit, client: TestClient) -> None:
    job = submit(priority=10)
    r = client.post(f"/v1/jobs/{job['id']}/priority", json={"priority": 95})
    assert r.status_code == 200 and r.json()["priority"] == 95
    assert client.get(f"/v1/jobs/{job['id']}").json()["priority"] == 95
    r = client.post(f"/v1/jobs/{job['id']}/priority", json={"priority": 101})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "priority"


def test_retry_clears_failed_images_and_reopens_the_job(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    job = submit(count=4, batch_size=2)
    led = ledger(redis_client, config)
    assert led.release(job["id"], 5) == [0, 1]  # as the scheduler would
    led.mark(job["id"], [0, 1])
    led.mark(job["id"], [2, 3], ok=False)
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "failed"
    r = client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 200
    body = r.json()
    assert (body["state"], body["done"], body["failed"]) == ("running", 2, 0)
    record = led.get(job["id"])
    assert record.requeued == 1  # the one task holding images 2 and 3
    assert led.release(job["id"], 5) == [1]  # released again, once
    r = client.post(f"/v1/jobs/{job['id']}/retry")  # nothing failed: no change
    assert r.status_code == 200 and r.json()["failed"] == 0


def test_retry_of_a_cancelled_job_is_409(submit: Submit, client: TestClient) -> None:
    job = submit()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    r = client.post(f"/v1/jobs/{job['id']}/retry")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_retry_does_not_requeue_tasks_never_released(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    job = submit(count=4, batch_size=2)
    led = ledger(redis_client, config)
    assert led.release(job["id"], 1) == [0]
    led.mark(job["id"], [0, 1, 2], ok=False)  # image 2 belongs to task 1, not released yet
    assert led.retry_failed(job["id"]) == ("queued", 3)
    assert led.release(job["id"], 5) == [0, 1]


def test_release_keeps_a_cursor_per_cell(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    # 3 cells of 2 tasks (4 images each, 2 per task): the scheduler releases each model's
    # cells on their own, so a cell can go out before the ones ahead of it
    job = submit(count=4, batch_size=2, sweep={"cfg_scale": [3, 5, 7]})
    led = ledger(redis_client, config)
    assert led.release(job["id"], 3, cells=[2, 0], tasks_per_cell=2) == [4, 5, 0]
    record = led.get(job["id"])
    assert record.cell_cursors == {2: 6, 0: 1}
    assert (record.cursor, record.remaining_tasks) == (3, 3)
    led.mark(job["id"], [0, 1, 2], ok=False)  # task 0 is out; image 2 is task 1's, not out
    assert led.retry_failed(job["id"]) == ("queued", 3)
    assert led.get(job["id"]).requeued == 1  # task 0 only
    # the task given back belongs to cell 0: releasing cell 1 leaves it
    assert led.release(job["id"], 5, cells=[1], tasks_per_cell=2) == [2, 3]
    assert led.release(job["id"], 5) == [0, 1]  # all cells: the given-back task first
    assert led.release(job["id"], 5) == []
    assert led.get(job["id"]).remaining_tasks == 0


def test_a_job_from_before_per_cell_cursors_carries_on_where_it_was(
    submit: Submit, redis_client: redis.Redis, config: Config
) -> None:
    from scheduler.service import job_lanes

    job = submit(count=4, batch_size=2, sweep={"cfg_scale": [3, 5, 7]})  # 3 cells x 2 tasks
    led = ledger(redis_client, config)
    key = led.job_key(job["id"])
    # as the version before per-cell cursors left it: one cursor over all tasks, 0-2 out
    redis_client.hdel(key, "percell", "full")
    redis_client.hset(key, "cursor", 3)
    record = led.get(job["id"])
    assert (record.full_cells, record.cell_cursors) == (1, {1: 3})
    assert record.remaining_tasks == 3
    (active,) = [j for j in led.active() if j.id == job["id"]]
    assert job_lanes(active)[active.spec.model].cells == (1, 2)
    led.mark(job["id"], [2, 8], ok=False)  # image 2: task 1 (out); image 8: task 4 (not)
    assert led.retry_failed(job["id"]) == ("queued", 2)
    assert led.get(job["id"]).requeued == 1  # task 1 only
    assert led.release(job["id"], 10) == [1, 3, 4, 5]
    record = led.get(job["id"])
    assert (record.full_cells, record.cell_cursors) == (3, {})
    assert (record.cursor, record.remaining_tasks) == (6, 0)
    assert redis_client.hget(key, "percell") == b"1"
