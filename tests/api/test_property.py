"""Acceptance, property-based: whatever a client sends to any endpoint, the answer is never
a 5xx. Generated job specs mix plausible and junk JSON values for every JobSpec field;
paths and queries get random ids and parameters; raw bodies get random bytes."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from farm.api.app import create_app
from farm.config import Config
from farm.jobs import Ledger
from farm.spec import SWEEPABLE
from storage import LocalStore
from tests.api.conftest import LIMITS
from tests.servers import RedisServer
from workers.engine.names import SAMPLERS, SCHEDULES

NAMESPACE = "prop"
SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# text that includes lone surrogates, controls, RTL marks, astral characters
ODD = st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\U0001f98a", "\ufeff", "\n"])
TEXT = st.lists(st.characters() | ODD, max_size=12).map("".join)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-5, 5000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
SIDES = st.sampled_from([64, 128, 256, 512, 1024, 1032, 63, 0, -8, 100])
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["synthetic", "tiny-sd1", "ghost", "bad name", ""]),
    "negative_prompt": TEXT,
    "width": SIDES,
    "height": SIDES,
    "steps": st.integers(-1, 120),
    "cfg_scale": st.floats(-1, 40)
    | st.integers(-1, 40)
    | st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    "sampler_name": st.sampled_from([*SAMPLERS, "Heun", ""]),
    "scheduler": st.sampled_from([*SCHEDULES, "karras", ""]),
}


def plausible_or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy | strategy | strategy | JSON  # mostly plausible, sometimes anything


SWEEP_KEYS = st.sampled_from([*SWEEPABLE, "prompt", "seed", "count", "junk"])
SWEEP = st.dictionaries(
    SWEEP_KEYS,
    st.lists(st.one_of(*FIELD_VALUES.values()), max_size=4) | JSON,
    max_size=3,
)
SPEC_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **FIELD_VALUES,
    "prompt": TEXT | st.lists(TEXT, max_size=LIMITS["max_prompts"] + 2),
    "count": st.integers(-2, 3000) | st.integers(-(2**70), 2**70),
    "seed": st.integers(-3, 2**33) | st.integers(-(2**70), 2**70),
    "batch_size": st.none() | st.integers(-1, 20),
    "priority": st.integers(-5, 110),
    "sweep": SWEEP,
    "output_prefix": st.sampled_from(
        ["", "a/b", "team/run-1", "../x", "/abs", "a//b", "r\n", ".", "a/./b", "a/"]
    )
    | TEXT,
    "tags": st.lists(TEXT, max_size=4) | st.lists(st.just("t"), min_size=30, max_size=40),
}
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "negative_prompt": st.text(max_size=20),
    "count": st.integers(1, 20),
    "seed": st.integers(-1, 2**32 - 1),
    "width": st.sampled_from([64, 256, 512, 1024]),
    "height": st.sampled_from([64, 256, 512, 1024]),
    "steps": st.integers(1, LIMITS["max_steps"]),
    "cfg_scale": st.floats(0, LIMITS["max_cfg_scale"]),
    "sampler_name": st.sampled_from(SAMPLERS),
    "scheduler": st.sampled_from(SCHEDULES),
    "batch_size": st.none() | st.integers(1, LIMITS["max_batch_size"]),
    "priority": st.integers(0, 100),
    "sweep": st.fixed_dictionaries(
        {}, optional={"steps": st.lists(st.integers(1, 50), min_size=1, max_size=3)}
    ),
    "output_prefix": st.sampled_from(["", "a/b", "team/run-1", "x.y_z"]),
    "tags": st.lists(st.text(max_size=10), max_size=3),
}
VALID = st.fixed_dictionaries(
    {
        "model": st.just("synthetic"),
        "prompt": st.text(max_size=20) | st.lists(st.text(), min_size=1, max_size=5),
    },
    optional=VALID_FIELDS,
)
# a valid spec with one field replaced by a plausible-or-junk value
ONE_BAD = st.tuples(
    VALID,
    st.sampled_from(sorted(SPEC_FIELDS)).flatmap(
        lambda name: st.tuples(st.just(name), plausible_or_junk(SPEC_FIELDS[name]))
    ),
).map(lambda t: {**t[0], t[1][0]: t[1][1]})
SPECS = st.fixed_dictionaries(
    {},
    optional={
        **{name: plausible_or_junk(s) for name, s in SPEC_FIELDS.items()},
        "extra": JSON,
    },
)
BODIES = VALID | ONE_BAD | ONE_BAD | SPECS | JSON
JOB_IDS = TEXT | st.text(string.hexdigits.lower(), min_size=16, max_size=16) | st.just("..")
QUERY_VALUES = st.none() | TEXT | st.integers(-(2**70), 2**70).map(str) | st.integers(-2, 1100)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "*/*",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-16",
    ]
)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture(scope="module")
def rc(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(rc: redis.Redis, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    tmp: Path = tmp_path_factory.mktemp("api-property")
    config = Config(
        data_dir=str(tmp),
        redis_url="redis://unused",
        namespace=NAMESPACE,
        storage_url=str(tmp / "store"),
        **LIMITS,
    )
    return TestClient(create_app(config, redis_client=rc, store=LocalStore(tmp / "store")))


def encode(value: Any) -> bytes:
    # Python's encoder writes NaN/Infinity and escapes lone surrogates; httpx's refuses them
    return json.dumps(value).encode()


def check(r: Any) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    assert isinstance(r.json(), (dict, list)), r.text


@settings(SETTINGS, max_examples=250)
@given(body=BODIES)
def test_submit_never_5xx(client: TestClient, rc: redis.Redis, body: Any) -> None:
    r = client.post("/v1/jobs", content=encode(body), headers={"content-type": "application/json"})
    check(r)
    event(f"POST /v1/jobs -> {r.status_code}")
    if r.status_code == 201:
        job_id = r.json()["id"]
        Ledger(rc, NAMESPACE).mark(job_id, [0, r.json()["total"] - 1])
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        images = client.get(f"/v1/jobs/{job_id}/images")
        assert images.status_code == 200, images.text
        assert images.json()["images"][0]["index"] == 0
        cancel = client.post(f"/v1/jobs/{job_id}/cancel")  # 409 once all images are done
        assert cancel.status_code in (200, 409), cancel.text
    else:
        assert 400 <= r.status_code < 500
        detail = r.json()["detail"]
        assert isinstance(detail, (str, list)) and detail


@settings(SETTINGS, max_examples=150)
@given(
    job_id=JOB_IDS,
    which=st.sampled_from(["job", "images", "cancel", "list", "workers", "models", "healthz"]),
    params=st.dictionaries(st.sampled_from(["state", "limit", "offset", "x"]), QUERY_VALUES),
)
def test_paths_and_queries_never_5xx(
    client: TestClient, job_id: str, which: str, params: dict[str, Any]
) -> None:
    jid = quote(job_id.encode("utf-8", "surrogatepass"), safe="")
    method, path = {
        "job": ("GET", f"/v1/jobs/{jid}"),
        "images": ("GET", f"/v1/jobs/{jid}/images"),
        "cancel": ("POST", f"/v1/jobs/{jid}/cancel"),
        "list": ("GET", "/v1/jobs"),
        "workers": ("GET", "/v1/workers"),
        "models": ("GET", "/v1/models"),
        "healthz": ("GET", "/healthz"),
    }[which]
    query = "&".join(
        f"{k}={quote(str(v).encode('utf-8', 'surrogatepass'), safe='')}"
        for k, v in params.items()
        if v is not None
    )
    r = client.request(method, f"{path}?{query}" if query else path)
    check(r)
    event(f"{which} -> {r.status_code}")


@settings(SETTINGS, max_examples=100)
@given(
    body=st.binary(max_size=200) | JSON.map(encode),
    content_type=CONTENT_TYPES,
    path=st.sampled_from(["/v1/jobs", "/v1/jobs/0123456789abcdef/cancel", "/v1/jobs"]),
)
def test_raw_bodies_never_5xx(
    client: TestClient, body: bytes, content_type: str, path: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post(path, content=body, headers=headers)
    check(r)
    event(f"raw -> {r.status_code}")
