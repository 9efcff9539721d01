"""Property-based, from the OpenAPI document: schemathesis generates requests for every
operation of ``/openapi.json`` (valid ones and ones that violate the schema) and checks
the answers: never a 5xx, each answer matches its documented schema, data that breaks
the schema is refused. Not checked: that schema-valid data is accepted, since JobSpec's
limits (ranges, names) live in validators that the JSON schema does not express.

(schemathesis' lazy ``from_fixture`` loader does not work with pytest 9, so the schema's
Hypothesis strategy is used from a plain ``@given`` test instead.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis  # noqa: E402
import schemathesis.checks as checks  # noqa: E402
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from farm.api.app import create_app
from farm.config import Config
from storage import LocalStore
from tests.api.conftest import LIMITS
from tests.servers import RedisServer

GenerationMode = schemathesis.GenerationMode


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp: Path = tmp_path_factory.mktemp("api-schemathesis")
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        config = Config(
            data_dir=str(tmp), redis_url=server.url, storage_url=str(tmp / "store"), **LIMITS
        )
        app = create_app(config, redis_client=client, store=LocalStore(tmp / "store"))
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
        client.close()


def test_every_operation_conforms(api_schema: Any) -> None:
    cases = st.one_of(
        api_schema.as_strategy(GenerationMode.POSITIVE),
        api_schema.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])
        event(f"{case.method} {case.path} -> {response.status_code}")

    run()
