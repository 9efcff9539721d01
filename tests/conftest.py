"""Shared fixtures for the whole suite."""

from collections.abc import Iterator

import pytest

from farm import spec
from farm.config import Config


@pytest.fixture(autouse=True)
def _default_spec_limits() -> Iterator[None]:
    """Spec limits are process-wide (the API sets them from its config): give every test
    the defaults and undo whatever a test set."""
    spec.set_limits(Config.from_env({}))
    yield
    spec.set_limits(Config.from_env({}))
