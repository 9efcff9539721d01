"""The committed demo checkpoint, rendered through the engine (DPM++ 2M, the demo's default
steps and guidance) and read back by the analyser, which knows only the drawing rules."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from workers.demo import demo_checkpoint_path  # noqa: E402
from workers.demo.analyse import colour_error  # noqa: E402
from workers.demo.dataset import POSITIONS  # noqa: E402
from workers.demo.evaluate import (  # noqa: E402
    SEEDS,
    colour_shape_accuracy,
    position_report,
    quality_cases,
    size_report,
)
from workers.demo.model import DEFAULT_CFG_SCALE  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> Any:
    from workers.engine.loader import load_engine

    path = demo_checkpoint_path()
    assert path.exists(), f"{path} is missing: train it with python -m workers.demo.train"
    assert path.stat().st_size <= 32 * 2**20
    return load_engine(path)


@pytest.fixture(scope="module")
def default_run(engine: Any) -> tuple[dict[str, float], list[Any]]:
    return colour_shape_accuracy(engine, DEFAULT_CFG_SCALE)


def _show(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}", flush=True)


def _all_right_and_colour_error(rendered: list[Any]) -> tuple[float, float]:
    """Share of pictures right in all three, and the mean colour error (RGB units)."""
    truth = [case for case in quality_cases() for _ in SEEDS]
    pairs = list(zip(rendered, truth, strict=True))
    right = sum(r.analysis.matches(fg, bg, shape) for r, (fg, shape, bg) in pairs)
    error = sum(colour_error(r.analysis, fg, bg) for r, (fg, _, bg) in pairs)
    return right / len(pairs), error / len(pairs)


# The acceptance targets (MODEL_CARD.md has the figures measured on the committed
# checkpoint).
TARGETS = {"fg": 0.95, "bg": 0.95, "shape": 0.85}
POSITION_TARGET = 0.80


def test_colours_and_shapes(
    default_run: tuple[dict[str, float], list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    acc = default_run[0]
    _show(
        capsys,
        f"demo model, 24 prompts x 4 seeds, cfg {DEFAULT_CFG_SCALE:g}: foreground "
        f"{acc['fg']:.1%}, background {acc['bg']:.1%}, shape {acc['shape']:.1%} "
        f"(targets {TARGETS['fg']:.0%}, {TARGETS['bg']:.0%}, {TARGETS['shape']:.0%})",
    )
    for key, target in TARGETS.items():
        assert acc[key] >= target, f"{key} accuracy {acc[key]:.1%} is below {target:.0%}"


def test_guidance_matters(
    engine: Any,
    default_run: tuple[dict[str, float], list[Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same prompts and seeds at cfg 1 (no guidance) against the default scale."""
    acc, rendered = default_run
    acc_1, rendered_1 = colour_shape_accuracy(engine, 1.0)
    right, error = _all_right_and_colour_error(rendered)
    right_1, error_1 = _all_right_and_colour_error(rendered_1)
    _show(
        capsys,
        f"cfg 1 against cfg {DEFAULT_CFG_SCALE:g}: foreground colour right {acc_1['fg']:.1%} "
        f"/ {acc['fg']:.1%}, background {acc_1['bg']:.1%} / {acc['bg']:.1%}, mean colour "
        f"error {error_1:.1f} / {error:.1f} RGB units, shape {acc_1['shape']:.1%} / "
        f"{acc['shape']:.1%}, all three right {right_1:.1%} / {right:.1%}",
    )
    assert error < error_1, "guidance should bring colours closer to the palette"
    assert right >= right_1 + 0.05


def test_size_words(engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    report, _ = size_report(engine, DEFAULT_CFG_SCALE)
    _show(
        capsys,
        f"median area: small {report['small_median_px']:.0f} px, large "
        f"{report['large_median_px']:.0f} px ({report['large_over_small']:.2f}x)",
    )
    assert report["large_median_px"] >= 2 * report["small_median_px"]


def test_position_words(engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    report, _ = position_report(engine, DEFAULT_CFG_SCALE)
    _show(
        capsys,
        "centre in the named half: "
        + ", ".join(f"{k} {report[k]:.0%}" for k in (*POSITIONS, "all"))
        + f"; same prompts and seeds without the word: {report['baseline']:.0%}; the word "
        f"moves the centre by a median {report['median_shift_px']:.1f} px",
    )
    assert report["all"] >= POSITION_TARGET
    # the word, not the seeds, puts the shapes there: a model that ignores it scores its
    # baseline (about 60% here: "in the center" holds by chance for most seeds)
    assert report["all"] - report["baseline"] >= 0.15


def test_every_word_kind_conditions_the_model(
    engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Swapping any kind of word for another of its kind makes the UNet's noise prediction
    worse: the model uses every part of the grammar (a model that learned colours only
    shows no change for shape or position words)."""
    from workers.demo.probe import probe

    # 64 pictures: the rises are the same as on 128 to within a few points (MODEL_CARD.md),
    # far above the 5% asked, in half the time
    report = probe(engine, pictures=64)
    _show(
        capsys,
        "denoising loss with one word swapped: "
        + ", ".join(f"{k} {rise:+.0%} (t={t})" for k, (rise, t) in report.items()),
    )
    for kind, (rise, _) in report.items():
        assert rise >= 0.05, f"swapping the {kind} word changes the loss by {rise:+.1%} only"


def test_noise_at_the_last_timestep_still_shows_the_layout(
    engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Why the training script needs its placement lessons (stage 5): under the SD1
    schedule a picture noised to t = 999 can still be told from its mirror image far more
    often than chance, and less so the more noise there is, so the plain denoising loss
    lets the model take the layout from the noise instead of from a position word."""
    from workers.demo.probe import layout_leak

    leak = layout_leak(engine, pictures=128)
    _show(
        capsys,
        "picture told from its mirror image: "
        + ", ".join(f"t={t} {share:.0%}" for t, share in leak.items()),
    )
    shares = [leak[t] for t in sorted(leak, reverse=True)]
    assert shares == sorted(shares), "less noise must not hide the layout better"
    assert shares[0] > 0.6
