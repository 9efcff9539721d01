"""Each model family end to end on real servers (Redis-compatible server, S3 over HTTP, a
Celery worker process): the worker fetches a tiny SDXL, a tiny all-in-one Flux and a tiny
SD1 inpainting (9-channel) checkpoint from S3, loads each with its own engine, and stores
images whose parameters name the model and whose pixels are the engine's own render of
the same request."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from farm.spec import JobSpec
from storage.keys import image_key
from storage.png import parse_parameters, read_parameters
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

SPEC = {"prompt": ["a red circle", "a blue square"], "seed": 11, "width": 64, "height": 64,
        "steps": 2, "cfg_scale": 3.5, "sampler_name": "Euler", "batch_size": 2}  # fmt: skip


@pytest.fixture
def farm(model_farm: Cluster) -> Cluster:
    """The session's farm of one worker (tests/integration/conftest.py): ``xl``, ``flux``,
    ``inpainting``."""
    return model_farm


@pytest.mark.parametrize("model", ["xl", "flux", "inpainting"])
def test_a_worker_renders_the_family_from_its_checkpoint_in_s3(
    farm: Cluster, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = farm.ledger.create(JobSpec(model=model, **SPEC)).id  # type: ignore[arg-type]
    job = farm.wait(job_id, timeout=180)
    assert (job.state, job.done, job.failed) == ("done", 2, 0), job.summary()
    pngs = [
        farm.store.get_bytes(image_key("renders", job_id, i, job.plan.image(i).seed))
        for i in range(2)
    ]
    for i, png in enumerate(pngs):
        params = parse_parameters(read_parameters(png) or "")
        assert params["prompt"] == SPEC["prompt"][i]  # type: ignore[index]
        assert params["model"] == model and params["seed"] == 11  # seed + repeat index
        masks = "Conditional mask weight" in params["extra"]
        assert masks == (model == "inpainting")
    # the same request rendered here by the engine: the worker's pixels
    from workers.engine.base import BatchRequest, ImageRequest
    from workers.engine.loader import load_engine

    for k, v in farm.env_vars.items():  # type: ignore[attr-defined]
        monkeypatch.setenv(k, v)
    engine = load_engine(farm.files[model])  # type: ignore[attr-defined]
    images = tuple(ImageRequest(p, "", 11) for p in SPEC["prompt"])  # type: ignore[union-attr]
    want = engine.render(BatchRequest(images, 64, 64, 2, 3.5, "Euler", "Automatic"))
    for png, image in zip(pngs, want, strict=True):
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(image, dtype=np.int16)).max() <= 1
