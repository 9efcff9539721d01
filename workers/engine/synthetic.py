"""SyntheticEngine: renders a solid colour per image at once, without torch or weights.

The engine for load-testing the farm's plumbing (queues, ledger, storage, dashboards):
same interface and same determinism contract as a real engine, zero compute.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from workers.engine.base import BatchRequest, Progress


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A stable RGB colour for a seed (same on every machine and Python version)."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return digest[0], digest[1], digest[2]


class SyntheticEngine:
    family = "synthetic"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        batch.validate()
        size = (batch.width, batch.height)
        images = []
        for r in batch.images:
            images.append(Image.new("RGB", size, seed_colour(r.seed)))
            if progress is not None:
                progress()
        return images
