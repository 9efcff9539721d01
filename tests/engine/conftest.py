"""Shared fixtures: one tiny random SD1 checkpoint per session, loaded once."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def tiny_modules():
    from workers.engine.tiny import build_tiny_modules

    return build_tiny_modules(seed=0)


@pytest.fixture(scope="session")
def tiny_path(tiny_modules, tmp_path_factory):
    from workers.engine.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", *tiny_modules)


@pytest.fixture(scope="session")
def engine(tiny_path):
    from workers.engine.loader import load_engine

    return load_engine(tiny_path)


@pytest.fixture(scope="module")
def one_thread():
    """For a module on a tiny model (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    its tensors are too small to share among threads, so one thread is faster and does not
    slow to a crawl when other processes hold the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
