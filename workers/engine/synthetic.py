"""SyntheticEngine: renders a solid colour per image at once, without torch or weights.

The engine for load-testing the farm's plumbing (queues, ledger, storage, dashboards):
same interface and same determinism contract as a real engine, zero compute.
"""

from __future__ import annotations

import hashlib

from PIL import Image

from workers.engine.base import BatchRequest, ImageRequest, Progress


def seed_colour(seed: int) -> tuple[int, int, int]:
    """A stable RGB colour for a seed (same on every machine and Python version)."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return digest[0], digest[1], digest[2]


def image_colour(image: ImageRequest) -> tuple[int, int, int]:
    """An image's colour: its seed's, or with a variation seed (``subseed_strength`` s != 0)
    its seed's and its subseed's blended per channel, ``round(a * (1 - s) + b * s)``."""
    a = seed_colour(image.seed)
    s = image.subseed_strength
    if s == 0:
        return a
    b = seed_colour(image.subseed)
    return (
        round(a[0] * (1 - s) + b[0] * s),
        round(a[1] * (1 - s) + b[1] * s),
        round(a[2] * (1 - s) + b[2] * s),
    )


class SyntheticEngine:
    family = "synthetic"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        batch.validate()
        size = (batch.width, batch.height)
        images = []
        for r in batch.images:
            images.append(Image.new("RGB", size, image_colour(r)))
            if progress is not None:
                progress()
        return images
