"""One farm of one worker shared by the test modules that need a worker but no outage of
their own (LoRAs, each model family, img2img): a Redis-compatible server, S3 over HTTP and
a Celery worker process, started once for the session rather than once a module. Its
models: ``tiny`` (SD1), the LoRAs ``style`` and ``gone`` (registered, then its blob lost
from the store), ``xl`` (a tiny SDXL) and ``flux`` (a tiny all-in-one Flux, its T5
tokenizer named by FARM_FLUX_T5_TOKENIZER)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.models import ModelRegistry, read_safetensors_header
from storage.keys import model_key
from tests.cluster import Cluster, tiny_models
from tests.engine.test_lora import LDM_NAMES, TE_LAYERS, UNET_LAYERS


def layer_shapes(checkpoint: Path) -> dict[tuple[str, str], tuple[int, ...]]:
    """The weight shapes of the test's LoRA layers, read from the checkpoint's header
    (original-layout names), without building the model."""
    header = read_safetensors_header(checkpoint)
    names = {layer: f"model.diffusion_model.{LDM_NAMES[layer[1]]}.weight" for layer in UNET_LAYERS}
    for layer in TE_LAYERS:
        names[layer] = f"cond_stage_model.transformer.{layer[1]}.weight"
    return {layer: tuple(header[name]["shape"]) for layer, name in names.items()}


@pytest.fixture(scope="session")
def model_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.engine.test_lora import write_lora
    from workers.engine.tiny import (
        t5_tokenizer_dir,
        write_tiny_checkpoint,
        write_tiny_flux_checkpoint,
        write_tiny_sdxl_checkpoint,
    )

    tmp = tmp_path_factory.mktemp("model-farm")
    models = tiny_models(tmp, ("tiny",))
    shapes = layer_shapes(models["tiny"])
    models["style"], _ = write_lora(tmp / "style.safetensors", shapes, seed=1)
    models["gone"], _ = write_lora(tmp / "gone.safetensors", shapes, seed=2)
    models["xl"] = Path(write_tiny_sdxl_checkpoint(tmp / "xl.safetensors", seed=1))
    models["flux"] = Path(write_tiny_flux_checkpoint(tmp / "flux.safetensors", seed=2))
    models["inpainting"] = Path(write_tiny_checkpoint(tmp / "inp.safetensors", 4, True))
    env = {
        # torch's OpenMP threads wait without spinning: on a CPU that other processes keep
        # busy, spinning threads made each 2-image task take 3-6 s rather than 0.3-1 s
        "OMP_WAIT_POLICY": "PASSIVE",
        "FARM_FLUX_T5_TOKENIZER": str(t5_tokenizer_dir(models["flux"])),
    }
    with Cluster(tmp, workers=1, models=models, env=env) as cluster:
        cluster.files = models  # type: ignore[attr-defined]
        cluster.env_vars = env  # type: ignore[attr-defined]
        gone = ModelRegistry(cluster.r, cluster.config.namespace).get("gone")
        assert gone is not None and gone.engine == "lora"
        cluster.store.delete(model_key(gone.sha256))  # registered, then lost from the store
        yield cluster
