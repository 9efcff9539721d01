"""Model registry: names -> checkpoints stored by sha256, kept in Redis.

The blobs live in object storage (``storage.models``); this module only maps names to
them. The model ``synthetic`` is built in: it needs no checkpoint and renders a solid
image at once, for load-testing a farm's plumbing.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    engine: str  # "sd1" (a checkpoint the diffusion engine loads) or "synthetic"
    sha256: str = ""
    size: int = 0
    key: str = ""
    added_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SYNTHETIC_ENTRY = ModelEntry(name=SYNTHETIC, engine="synthetic")


class ModelRegistry:
    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.key = f"{namespace}:models"

    def add(self, entry: ModelEntry) -> ModelEntry:
        if entry.name == SYNTHETIC:
            raise ValueError(f"the name {SYNTHETIC!r} is reserved for the built-in model")
        if not entry.added_at:
            entry = ModelEntry(**{**entry.to_dict(), "added_at": time.time()})
        self.r.hset(self.key, entry.name, json.dumps(entry.to_dict()))
        return entry

    def get(self, name: str) -> ModelEntry | None:
        if name == SYNTHETIC:
            return SYNTHETIC_ENTRY
        raw = self.r.hget(self.key, name)
        return ModelEntry(**json.loads(raw)) if raw else None

    def list(self) -> list[ModelEntry]:
        entries = [ModelEntry(**json.loads(v)) for v in self.r.hvals(self.key)]
        return [SYNTHETIC_ENTRY, *sorted(entries, key=lambda e: e.name)]

    def remove(self, name: str) -> bool:
        return bool(self.r.hdel(self.key, name))


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, read without torch."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            return json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from None


def probe_engine(path: str | Path) -> str:
    """Which engine family a checkpoint needs, from its tensor names (no torch)."""
    header = read_safetensors_header(path)
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    if any(name.startswith("double_blocks.") for name in header):
        return "flux"
    if any(name.startswith("conditioner.embedders.1") for name in header):
        return "sdxl"
    if k in header:
        width = header[k]["shape"][1]
        return {1024: "sd2", 1280: "sdxl-refiner", 2048: "sdxl"}.get(width, "sd1")
    if any(name.startswith("model.diffusion_model.") for name in header):
        return "sd1"
    raise ValueError(f"{path}: no known diffusion model layout in its tensor names")
