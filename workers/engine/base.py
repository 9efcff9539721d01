"""The interface every diffusion engine implements, one engine class per model family.
Torch-free: importing this module costs nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from workers.engine.names import SAMPLERS, SCHEDULES, resolve_schedule

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "BatchRequest",
    "Engine",
    "EngineError",
    "ImageRequest",
    "img2img_start",
    "LoraError",
    "LoraRequest",
    "Progress",
    "TorchEngine",
]

Progress = Callable[[], object]  # called once per completed step of a render


class EngineError(Exception):
    """A request or checkpoint the engine cannot serve (bad file, unknown sampler, ...)."""


class LoraError(EngineError):
    """A LoRA that cannot be applied (missing, unreadable, matching no layer of the model);
    the message names it."""


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    seed: int


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA file to merge into the model's weights for a batch (``workers.engine.lora``)."""

    name: str  # as registered; errors and logs name it
    path: str  # the local .safetensors file
    weight: float  # its multiplier: 0 leaves the model as it is


@dataclass(frozen=True)
class BatchRequest:
    images: tuple[ImageRequest, ...]  # one batch; prompts and seeds may differ per image
    width: int
    height: int
    steps: int
    cfg_scale: float
    sampler_name: str  # A1111 names, see SAMPLERS
    scheduler: str  # A1111 schedule names, see SCHEDULES
    # merged into the weights for the whole batch, in this order; an engine that takes
    # LoRAs has an ``apply_loras`` method and renders with exactly these (none: the model's
    # own weights)
    loras: tuple[LoraRequest, ...] = ()
    # img2img: every image starts from this picture (RGB, exactly width x height) noised to
    # the point ``denoising_strength`` of the schedule says, instead of from pure noise
    # (A1111's img2img); an engine that can do it has ``takes_init_image = True``
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75

    def validate(self, multiple: int = 8) -> None:
        """Raise EngineError naming the bad field and the allowed range."""
        if not self.images:
            raise EngineError("images: a batch needs at least one image")
        for field, value in (("width", self.width), ("height", self.height)):
            if value < multiple or value % multiple:
                raise EngineError(f"{field}: {value} is not a positive multiple of {multiple}")
        if self.steps < 1:
            raise EngineError(f"steps: {self.steps} must be >= 1")
        if self.cfg_scale < 0:
            raise EngineError(f"cfg_scale: {self.cfg_scale} must be >= 0")
        if self.init_image is not None:
            size = tuple(self.init_image.size)
            if size != (self.width, self.height):
                raise EngineError(
                    f"init_image: {size[0]}x{size[1]}, not the batch's "
                    f"{self.width}x{self.height} (resize it first)"
                )
            if not 0 < self.denoising_strength <= 1:
                raise EngineError(
                    f"denoising_strength: {self.denoising_strength} must be above 0, at most 1"
                )
        try:
            resolve_schedule(self.sampler_name, self.scheduler)
        except ValueError as exc:
            raise EngineError(str(exc)) from None


def img2img_start(steps: int, denoising_strength: float) -> int:
    """Where img2img enters a schedule of ``steps`` steps (``steps + 1`` sigmas, the last
    0): A1111's ``t_enc = int(min(strength, 0.999) * steps)`` steps are left, so sampling
    runs over ``sigmas[steps - t_enc - 1:]``, ``t_enc + 1`` steps (all of them at 1, one at
    the smallest strengths)."""
    t_enc = int(min(denoising_strength, 0.999) * steps)
    return steps - t_enc - 1


class TorchEngine:
    """An engine whose weights are torch modules, the attributes ``module_names`` names:
    ``device`` is where they are, and setting it moves every one there (the worker parks
    an engine in host RAM, and brings it back, by setting it)."""

    module_names: tuple[str, ...] = ()
    _device: str = "cpu"

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, device: str) -> None:
        for name in self.module_names:
            getattr(self, name).to(device)  # a module moves in place
        self._device = str(device)


class Engine(Protocol):
    family: str  # e.g. "sd1"
    device: str

    def render(self, batch: BatchRequest, progress: Progress | None = None) -> list[Image.Image]:
        """The batch's images, in order. ``progress``, if given, is called (with no
        arguments) at every step the engine completes, so a caller can tell a long
        render from a hung one."""
        ...
