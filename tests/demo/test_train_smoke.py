"""The training script's smoke configuration: runs in seconds, its losses go down, it writes
a checkpoint the engine loads like any SD1 file, and a stopped run resumes to the same end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the trainer sets its own
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    from workers.demo.train import main

    out = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        assert main(["--config", "smoke", "--out", str(out), "--seed", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, time.perf_counter() - start


def test_smoke_training_runs_and_learns(smoke_run: tuple[Path, float]) -> None:
    from workers.demo.train import CHECKPOINT_NAME
    from workers.engine.base import BatchRequest, ImageRequest
    from workers.engine.loader import load_engine, read_header

    out, took = smoke_run
    assert took < 120, f"smoke training took {took:.0f}s"
    losses = json.loads((out / "losses.json").read_text())
    for stage in ("vae", "unet"):
        values = [v for _, v in losses[stage]]
        assert len(values) >= 3, stage
        assert values[-1] < 0.9 * values[0], f"{stage} loss did not go down: {values}"
    log = (out / "train.log").read_text()
    assert "wall" in log and "cpu" in log and "wrote" in log
    assert (out / "loss_curve.png").stat().st_size > 0

    path = out / CHECKPOINT_NAME
    tensors, metadata = read_header(path)
    assert {
        "farm.unet_config",
        "farm.vae_config",
        "farm.text_encoder_config",
        "farm.scheduler_config",
    } <= set(metadata)
    assert {t["dtype"] for t in tensors.values()} <= {"F16", "I64"}
    engine = load_engine(path)
    batch = BatchRequest(
        (ImageRequest("a red circle on a blue background", "", 1),),
        64,
        64,
        4,
        5.0,
        "DPM++ 2M",
        "Automatic",
    )
    (image,) = engine.render(batch)
    assert image.size == (64, 64)


def test_resume_gives_the_same_run(smoke_run: tuple[Path, float], tmp_path: Path) -> None:
    """A run stopped after its VAE stage and resumed from its saved state ends with the
    same losses as the run that was not stopped."""
    from workers.demo.train import CONFIGS, Trainer

    whole = json.loads((smoke_run[0] / "losses.json").read_text())
    first = Trainer(CONFIGS["smoke"], tmp_path, seed=0, save_every=1e9)
    first.train_vae()
    first.stage, first.step, first.opt = "encode", 0, None
    first.save_state()
    second = Trainer(CONFIGS["smoke"], tmp_path, seed=0, save_every=1e9)
    second.run()
    assert "resumed at stage encode" in (tmp_path / "train.log").read_text()
    for stage, points in whole.items():  # equal up to float summation order
        # the position stage starts by rounding the weights to fp16, where a difference
        # in the last float32 bits can round a weight one fp16 step the other way
        rel = 1e-4 if stage == "position" else 1e-5
        assert [s for s, _ in points] == [s for s, _ in second.losses[stage]]
        assert [v for _, v in points] == pytest.approx(
            [v for _, v in second.losses[stage]], rel=rel
        )


def test_position_stage_runs_in_the_full_run_and_from_a_checkpoint(
    smoke_run: tuple[Path, float], tmp_path: Path
) -> None:
    """The position stage runs after the decoder in a whole run, and ``--from-checkpoint``
    runs only it, on the weights of an exported checkpoint, and changes them."""
    from workers.demo.train import CHECKPOINT_NAME, CONFIGS, main
    from workers.engine.loader import read_header
    from workers.engine.sd1 import load_components

    cfg = CONFIGS["smoke"]
    whole = json.loads((smoke_run[0] / "losses.json").read_text())
    assert [s for s, _ in whole["position"]][-1] == cfg.position_steps

    base = smoke_run[0] / CHECKPOINT_NAME
    threads = torch.get_num_threads()
    try:
        args = ["--config", "smoke", "--out", str(tmp_path), "--seed", "0"]
        assert main([*args, "--from-checkpoint", str(base)]) == 0
    finally:
        torch.set_num_threads(threads)
    log = (tmp_path / "train.log").read_text()
    assert f"starting at stage position from {base}" in log
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert not losses["vae"] and not losses["unet"] and not losses["decoder"]
    assert [s for s, _ in losses["position"]][-1] == cfg.position_steps
    assert all(v > 0 for _, v in losses["position"])

    tuned = tmp_path / CHECKPOINT_NAME
    assert set(read_header(tuned)[0]) == set(read_header(base)[0])
    before, after = load_components(base), load_components(tuned)
    changed = [
        name
        for name, p in after.unet.state_dict().items()
        if not torch.equal(p, before.unet.state_dict()[name])
    ]
    assert changed, "the position stage left the UNet as it was"
    vae_before, vae_after = before.vae.state_dict(), after.vae.state_dict()
    assert all(torch.equal(vae_after[k], v) for k, v in vae_before.items()), "VAE changed"
