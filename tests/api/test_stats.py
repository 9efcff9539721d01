"""``GET /v1/stats`` against a real Redis server: the counts match the jobs, the Redis
commands the API sends for it do not grow with the number of jobs, Redis down is a 503."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from farm.api.app import TOTALS, FarmStats, create_app
from farm.config import Config
from farm.jobs import STATES, Ledger
from farm.spec import JobSpec
from farm.workers_registry import WorkerRegistry
from storage import LocalStore
from tests.servers import free_port

Submit = Callable[..., dict[str, Any]]


def listed(client: TestClient, state: str) -> int:
    r = client.get("/v1/jobs", params={"state": state, "limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json())


def test_counts_match_the_jobs_after_submit_pause_cancel_and_progress(
    submit: Submit, client: TestClient, redis_client: redis.Redis, config: Config
) -> None:
    led = Ledger(redis_client, config.namespace)
    empty = client.get("/v1/stats")
    assert empty.status_code == 200, empty.text
    assert empty.json() == {
        "jobs": dict.fromkeys(STATES, 0),
        "images_outstanding": 0,
        "images_per_s": 0.0,
        "totals": dict.fromkeys(TOTALS, 0),
        "workers": 0,
    }
    queued = submit(prompt=["a", "b", "c"])  # 3 images
    running = submit(count=4, batch_size=2)
    paused = submit(count=2)
    cancelled = submit(count=2)
    done = submit(count=2)
    failed = submit(count=2)
    assert client.post(f"/v1/jobs/{paused['id']}/pause").status_code == 200
    assert client.post(f"/v1/jobs/{cancelled['id']}/cancel").status_code == 200
    assert led.claim(running["id"], 0, "w1") == "ok"
    led.mark(running["id"], [0, 1])
    led.mark(running["id"], [2], ok=False)
    led.mark(done["id"], [0, 1])
    led.mark(failed["id"], [0])
    led.mark(failed["id"], [1], ok=False)
    reg = WorkerRegistry(redis_client, config.namespace)
    for name in ("n1-gpu0", "n1-gpu1", "n2-gpu0"):
        reg.publish(name, {"device": "cuda:0"}, ttl=30)
    reg.remove("n1-gpu1")
    started = led.get(running["id"]).started_at
    assert started is not None

    t0 = time.time()
    got = client.get("/v1/stats").json()
    t1 = time.time()
    FarmStats.model_validate(got)  # the answer is what the OpenAPI document says
    jobs = (queued, running, paused, cancelled, done, failed)
    states = Counter(client.get(f"/v1/jobs/{j['id']}").json()["state"] for j in jobs)
    assert set(states) == set(STATES)  # one job in each state
    assert got["jobs"] == {s: states[s] for s in STATES}
    assert got["jobs"] == {s: listed(client, s) for s in STATES}
    assert got["images_outstanding"] == 3 + (4 - 2 - 1)  # the paused job's not
    # the running job's images/s: 2 done since its first task started
    assert 2 / (t1 - started) - 1e-4 <= got["images_per_s"] <= 2 / (t0 - started) + 1e-4
    assert got["totals"] == {
        **dict.fromkeys(TOTALS, 0),
        "jobs_submitted": 6,
        "images_done": 2 + 2 + 1,
        "images_done:synthetic": 5,
        "images_failed": 1 + 1,
        "images_failed:synthetic": 2,
        "task_runs": 1,
    }
    assert got["workers"] == 2 == len(client.get("/v1/workers").json())

    # more changes: the paused job resumes (queued: it never started), the queued one is
    # cancelled, the failed one's image is retried (running again)
    assert client.post(f"/v1/jobs/{paused['id']}/resume").status_code == 200
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 200
    assert client.post(f"/v1/jobs/{failed['id']}/retry").status_code == 200
    again = client.get("/v1/stats").json()
    want = {**got["jobs"], "queued": 1, "paused": 0, "cancelled": 2, "running": 2, "failed": 0}
    assert again["jobs"] == want == {s: listed(client, s) for s in STATES}
    assert again["images_outstanding"] == 2 + 1 + 1  # resumed, running, retried
    assert again["totals"]["images_retried"] == 1


def counting_client(url: str) -> tuple[redis.Redis, list[str]]:
    """A client that notes the name of each command it sends, pipelined ones too."""
    sent: list[str] = []

    def name(cmd: Any) -> str:
        return (cmd.decode() if isinstance(cmd, bytes) else str(cmd)).upper()

    class Counting(redis.Connection):
        def send_command(self, *args: Any, **kwargs: Any) -> None:
            sent.append(name(args[0]))
            super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            sent.extend(name(c[0]) for c in commands)
            return super().pack_commands(commands)

    pool = redis.ConnectionPool.from_url(url, connection_class=Counting)
    return redis.Redis(connection_pool=pool), sent


@pytest.fixture
def counted(config: Config, store: LocalStore) -> Iterator[tuple[TestClient, list[str]]]:
    r, sent = counting_client(config.redis_url)
    yield TestClient(create_app(config, redis_client=r, store=store)), sent
    r.close()


def test_redis_commands_do_not_grow_with_the_jobs(
    counted: tuple[TestClient, list[str]], redis_client: redis.Redis, config: Config
) -> None:
    client, sent = counted
    led = Ledger(redis_client, config.namespace)
    WorkerRegistry(redis_client, config.namespace).publish("n1-gpu0", {}, ttl=30)

    def add_jobs(numbers: range) -> None:  # in every unfinished state, and some cancelled
        for i in numbers:
            job = led.create(JobSpec(model="synthetic", prompt="x", count=2), 2).id
            if i % 4 == 1:
                led.pause(job)
            elif i % 4 == 2:
                led.claim(job, 0, "w1")
            elif i % 4 == 3:
                led.cancel(job)

    def commands(path: str) -> list[str]:
        client.get(path)  # warm: connection handshake, script load, ended-index check
        del sent[:]
        r = client.get(path)
        assert r.status_code == 200, r.text
        return list(sent)

    add_jobs(range(5))
    few = commands("/v1/stats")
    few_listed = commands("/v1/jobs?state=queued&limit=500")
    add_jobs(range(5, 200))
    many = commands("/v1/stats")
    many_listed = commands("/v1/jobs?state=queued&limit=500")
    got = client.get("/v1/stats").json()
    assert got["jobs"] == {"queued": 50, "running": 50, "paused": 50, "cancelled": 50,
                           "done": 0, "failed": 0}  # fmt: skip
    assert got["workers"] == 1
    # one script call for the ledger, the worker index and inventories: the same
    # commands with 5 jobs as with 200
    assert few == many and len(many) <= 4, many
    assert Counter(many)["EVALSHA"] == 1
    # (listing an unfinished state, as the dashboard counted before, reads every
    # unfinished job: 146 more here)
    assert len(many_listed) - len(few_listed) == 150 - 4, (few_listed, many_listed)


def test_redis_down_is_a_503_with_a_message(config: Config) -> None:
    dead = redis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, socket_timeout=0.5
    )
    client = TestClient(create_app(config, redis_client=dead))
    r = client.get("/v1/stats")
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert detail.startswith("the job database (Redis) is unavailable: ConnectionError")
    doc = client.get("/openapi.json").json()["paths"]["/v1/stats"]["get"]
    assert {"200", "503"} <= set(doc["responses"])
    schema = doc["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/FarmStats")
