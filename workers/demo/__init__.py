"""The embedded demo model ``demo-shapes``: a miniature SD1.x trained by this project on
pictures it draws itself (see ``MODEL_CARD.md``), shipped as package data.

Torch-free on import: ``dataset``, ``analyse`` and ``contact_sheet`` need numpy and PIL
only; ``model`` and ``train`` import torch when used.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "demo-shapes"
ASSETS_DIR = Path(__file__).parent / "assets"


def demo_checkpoint_path() -> Path:
    """The committed checkpoint (original single-file SD1 layout, configs in metadata)."""
    return ASSETS_DIR / f"{DEMO_MODEL_NAME}.safetensors"


def demo_render_defaults() -> dict[str, object]:
    """Sampler, steps and guidance the demo model was measured with (see MODEL_CARD.md)."""
    from workers.demo.model import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS

    return {
        "sampler_name": DEFAULT_SAMPLER,
        "scheduler": "Automatic",
        "steps": DEFAULT_STEPS,
        "cfg_scale": DEFAULT_CFG_SCALE,
        "width": 64,
        "height": 64,
    }
