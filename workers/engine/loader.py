"""Open a checkpoint file: probe its model family from the state-dict keys (reading only
the safetensors header, no torch) and build the engine for that family."""

from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path
from typing import Any

from workers.engine.base import Engine, EngineError, Progress

# family -> module holding its engine class and import_libraries (imported only when used)
ENGINES = {
    "sd1": ("workers.engine.sd1", "SD1Engine"),
    "sdxl": ("workers.engine.sdxl", "SDXLEngine"),
    "flux": ("workers.engine.flux", "FluxEngine"),
}
SUPPORTED_FAMILIES = tuple(ENGINES)
SD_ATTN2_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
CLIP_L_NORM_KEY = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl-refiner", 2048: "sdxl"}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(tensors: name -> {"dtype", "shape", ...}, metadata) of a .safetensors file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than a header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise ValueError(f"implausible header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
    except FileNotFoundError:
        raise EngineError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise EngineError(f"{path.name} is not a readable .safetensors file: {exc}") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def probe_family(path: str | Path) -> str:
    """"sd1", "sd2", "sdxl", "sdxl-refiner" or "flux", from the state-dict keys."""
    tensors, _ = read_header(path)
    keys = tensors.keys()
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if SD_ATTN2_KEY in tensors:
        width = tensors[SD_ATTN2_KEY]["shape"][1]
        if width in CONTEXT_WIDTH_FAMILY:
            return CONTEXT_WIDTH_FAMILY[width]
        # a non-standard size (e.g. a test model): SD1 if its CLIP-L text encoder feeds it
        if CLIP_L_NORM_KEY in tensors and tensors[CLIP_L_NORM_KEY]["shape"] == [width]:
            return "sd1"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    raise EngineError(f"{Path(path).name}: not a recognised diffusion checkpoint "
                      f"({len(tensors)} tensors, none of the SD1/SD2/SDXL/Flux keys)")


def import_libraries(family: str = "sd1") -> None:
    """Import the code that loading a checkpoint of ``family`` needs (seconds the first
    time), so that it can be done before a load whose progress is watched."""
    if family in ENGINES:
        importlib.import_module(ENGINES[family][0]).import_libraries()


def load_engine(path: str | Path, device: str = "cpu", progress: Progress | None = None) -> Engine:
    """The engine for a checkpoint: fp32 on CPU, fp16 on CUDA (bf16 for Flux). ``progress``
    is called as the load goes on."""
    family = probe_family(path)
    if family not in SUPPORTED_FAMILIES:
        raise EngineError(f"{Path(path).name}: family {family} not supported yet "
                          f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    module, name = ENGINES[family]
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class.from_single_file(path, device=device, progress=progress)
