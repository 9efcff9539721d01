import subprocess
import sys

import pytest

from workers.engine import BatchRequest, EngineError, ImageRequest
from workers.engine.synthetic import SyntheticEngine, seed_colour


def batch(*seeds: int, width: int = 96, height: int = 64) -> BatchRequest:
    return BatchRequest(
        images=tuple(ImageRequest("p", "", s) for s in seeds),
        width=width,
        height=height,
        steps=20,
        cfg_scale=7.0,
        sampler_name="Euler a",
        scheduler="Automatic",
    )


def test_size_and_deterministic_colour():
    images = SyntheticEngine().render(batch(1, 2, 1))
    assert [im.size for im in images] == [(96, 64)] * 3
    assert all(im.mode == "RGB" for im in images)
    assert images[0].getpixel((5, 7)) == images[2].getpixel((90, 60)) == seed_colour(1)
    assert images[0].getcolors() == [(96 * 64, seed_colour(1))]
    assert seed_colour(1) != seed_colour(2)


def test_validates_like_a_real_engine():
    with pytest.raises(EngineError, match="width"):
        SyntheticEngine().render(batch(1, width=100))
    with pytest.raises(EngineError, match="sampler_name"):
        SyntheticEngine().render(
            BatchRequest((ImageRequest("p", "", 1),), 64, 64, 20, 7.0, "Heun", "Automatic")
        )


def test_package_and_names_import_no_torch():
    code = (
        "import sys, workers.engine, workers.engine.base, workers.engine.synthetic, "
        "workers.engine.loader; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "from workers.engine.base import SAMPLERS, SCHEDULES; print(SAMPLERS, SCHEDULES)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Euler a" in out.stdout and "Karras" in out.stdout


def test_progress_is_told_of_every_image():
    ticks = []
    images = SyntheticEngine().render(batch(1, 2, 3), progress=lambda: ticks.append(1))
    assert len(images) == 3 and len(ticks) == 3
