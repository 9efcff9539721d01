"""The interface every diffusion engine implements, one engine class per model family.
Torch-free: importing this module costs nothing."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from workers.engine.names import MASKED_CONTENT, SAMPLERS, SCHEDULES, resolve_schedule

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import Tensor

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "AddonError",
    "BatchRequest",
    "EmbeddingError",
    "EmbeddingRequest",
    "Engine",
    "EngineError",
    "HIRES_LATENT_MODES",
    "HIRES_UPSCALERS",
    "HiresRequest",
    "ImageRequest",
    "hires_start",
    "hires_sizes",
    "img2img_start",
    "LoraError",
    "LoraRequest",
    "Progress",
    "TorchEngine",
    "ancestral_generators",
    "first_noise",
    "slerp",
]

Progress = Callable[[], object]  # called once per completed step of a render


class EngineError(Exception):
    """A request or checkpoint the engine cannot serve (bad file, unknown sampler, ...)."""


class AddonError(EngineError):
    """An add-on file (LoRA, embedding) that cannot be used; the message names it."""


class LoraError(AddonError):
    """A LoRA that cannot be applied (missing, unreadable, matching no layer of the model);
    the message names it."""


class EmbeddingError(AddonError):
    """A textual-inversion embedding that cannot be used (unreadable, without the tensors
    its layout needs, made for another model family or width); the message names it."""


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    seed: int
    # A1111's variation seed: the image's initial noise is slerp'd toward the subseed's
    # noise by this strength (``first_noise``); 0 leaves it the seed's
    subseed: int = 0
    subseed_strength: float = 0.0


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA file to merge into the model's weights for a batch (``workers.engine.lora``)."""

    name: str  # as registered; errors and logs name it
    path: str  # the local .safetensors file
    weight: float  # its multiplier: 0 leaves the model as it is


@dataclass(frozen=True)
class EmbeddingRequest:
    """A textual-inversion embedding a batch's prompts may name (``workers.engine.
    embeddings``): where its name occurs in a prompt, its vectors take the name's place."""

    name: str  # as registered: the word prompts use, and what errors name
    path: str  # the local .safetensors file (``emb_params``, or SDXL's clip_l and clip_g)


# A1111's hires upscalers the engines have: the latent ones (``torch.nn.functional.
# interpolate`` of the first pass's latents: mode, antialias), then the pixel ones (the
# first pass decoded, resized with PIL, encoded again); ESRGAN and co need weights
HIRES_LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
HIRES_PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
HIRES_UPSCALERS = (*HIRES_LATENT_MODES, *HIRES_PIXEL_UPSCALERS)
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's txt2img default for the hires pass


def hires_sizes(
    width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0
) -> tuple[int, int, int, int]:
    """A1111's hires target (``calculate_target_resolution``): ``(upscale_w, upscale_h,
    final_w, final_h)``. The first pass is upscaled to ``width x height`` times ``scale``
    (rounded down), or to ``resize_x x resize_y`` (one of them 0: the other from the aspect
    ratio; both: to cover that box, the latents then cropped to it about the centre). The
    final size is what the latents hold, so a multiple of 8 (A1111's ``target // 8``)."""
    if resize_x == 0 and resize_y == 0:
        to_w, to_h = int(width * scale), int(height * scale)
        return to_w, to_h, to_w // 8 * 8, to_h // 8 * 8
    if resize_y == 0:
        to_w, to_h = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_w, to_h = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_w, to_h = resize_x, resize_x * height // width
        else:
            to_w, to_h = resize_y * width // height, resize_y
        crop_w, crop_h = (to_w - resize_x) // 8, (to_h - resize_y) // 8
        return to_w, to_h, (to_w // 8 - crop_w) * 8, (to_h // 8 - crop_h) * 8
    return to_w, to_h, to_w // 8 * 8, to_h // 8 * 8


def hires_start(steps: int, denoising_strength: float) -> tuple[int, int]:
    """The hires pass's schedule, A1111's (``setup_img2img_steps`` with the steps given,
    as the hires pass gives them whatever ``img2img_fix_steps``): ``(full, start)``, a
    schedule of ``full = int(steps / min(strength, 0.999))`` steps sampled from
    ``sigmas[start:]``, ``start = full - steps``: exactly ``steps`` steps."""
    full = int(steps / min(denoising_strength, 0.999))
    return full, full - steps


@dataclass(frozen=True)
class HiresRequest:
    """A1111's hires fix: after the txt2img pass at the batch's size, its latents are
    upscaled (``upscaler``) to ``hires_sizes`` and sampled again as img2img over the tail
    of a schedule (``hires_start``) from fresh noise of each image's seed."""

    scale: float = 2.0
    resize_x: int = 0  # 0 and 0: from scale
    resize_y: int = 0
    upscaler: str = "Latent"  # one of HIRES_UPSCALERS
    steps: int = 0  # 0: the first pass's steps
    denoising_strength: float = DEFAULT_HIRES_STRENGTH

    def sizes(self, width: int, height: int) -> tuple[int, int, int, int]:
        return hires_sizes(width, height, self.scale, self.resize_x, self.resize_y)

    def validate(self, width: int, height: int, multiple: int = 8) -> None:
        if self.upscaler not in HIRES_UPSCALERS:
            raise EngineError(
                f"hires.upscaler: {self.upscaler!r} is not one of {', '.join(HIRES_UPSCALERS)}"
            )
        if not 1 <= self.scale <= 4:
            raise EngineError(f"hires.scale: {self.scale} must be between 1 and 4")
        for field, value in (("resize_x", self.resize_x), ("resize_y", self.resize_y)):
            if value < 0 or value % multiple:
                raise EngineError(f"hires.{field}: {value} is not 0 or a multiple of {multiple}")
        if self.steps < 0:
            raise EngineError(f"hires.steps: {self.steps} must be >= 0 (0: the same as steps)")
        if not 0 < self.denoising_strength <= 1:
            raise EngineError(
                f"hires.denoising_strength: {self.denoising_strength} must be above 0, at most 1"
            )
        _, _, w, h = self.sizes(width, height)
        if w < multiple or h < multiple:
            raise EngineError(f"hires: the upscaled size {w}x{h} is too small")


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
    # textual-inversion embeddings the prompts may name (A1111's): a name in a prompt or
    # negative prompt is replaced by its vectors; an engine that reads them has
    # ``takes_embeddings = True`` (other names are plain text, as without any)
    embeddings: tuple[EmbeddingRequest, ...] = ()
    # A1111's Clip skip (SD1): the prompts' states from this layer of the text encoder,
    # counted from the last (1: the last); an engine that reads it has ``takes_clip_skip``
    clip_skip: int = 1
    # img2img: every image starts from this picture (RGB, exactly width x height) noised to
    # the point ``denoising_strength`` of the schedule says, instead of from pure noise
    # (A1111's img2img); an engine that can do it has ``takes_init_image = True``
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    # inpainting (with init_image): the part to repaint, mode "L" at width x height, white
    # (above half) repainted (A1111's latent mask: the mask at the latents' size, rounded);
    # outside it every step's result is the picture's own latent. ``masked_content``
    # (``MASKED_CONTENT``): "latent noise" and "latent nothing" replace the picture's
    # latent under the mask by its seed's noise or zeros ("fill" is done to the picture
    # before, see ``workers.engine.inpaint``); an engine that can do it has ``takes_mask``
    mask: Image.Image | None = None
    masked_content: str = "original"
    # hires fix (txt2img only): the images come out at ``hires.sizes(width, height)``; an
    # engine that can do it has ``takes_hires = True``
    hires: HiresRequest | None = None
    # A1111's "Resize seed from" (width, height): each image's seed noise is drawn as for
    # a picture of this size and set into the middle of its own (``first_noise``), so the
    # composition of that size carries over; None: drawn at the batch's size
    seed_resize_from: tuple[int, int] | None = None
    # A1111's ENSD (eta noise seed delta): once an image's first noise is drawn, its
    # ancestral noise comes from a new generator of its seed plus this (0: the same one)
    eta_noise_seed_delta: int = 0

    def seed_noise_size(self, factor: int = 8) -> tuple[int, int] | None:
        """The (height, width) in latents of the seed noise drawn, when it is resized from
        another size than the batch's (``seed_resize_from``); None otherwise."""
        if self.seed_resize_from is None:
            return None
        w, h = self.seed_resize_from
        if (w // factor, h // factor) == (self.width // factor, self.height // factor):
            return None
        return h // factor, w // factor

    def validate(self, multiple: int = 8) -> None:
        """Raise EngineError naming the bad field and the allowed range."""
        if not self.images:
            raise EngineError("images: a batch needs at least one image")
        for field, value in (("width", self.width), ("height", self.height)):
            if value < multiple or value % multiple:
                raise EngineError(f"{field}: {value} is not a positive multiple of {multiple}")
        if self.steps < 1:
            raise EngineError(f"steps: {self.steps} must be >= 1")
        for image in self.images:
            strength = image.subseed_strength
            if not (math.isfinite(strength) and 0 <= strength <= 1):
                raise EngineError(f"subseed_strength: {strength} must be between 0 and 1")
            if image.subseed < 0:
                raise EngineError(f"subseed: {image.subseed} must be >= 0")
        if self.seed_resize_from is not None:
            w, h = self.seed_resize_from
            if w < multiple or h < multiple:
                raise EngineError(
                    f"seed_resize_from: {w}x{h} must be at least {multiple}x{multiple}"
                )
        if self.eta_noise_seed_delta < 0:
            raise EngineError(f"eta_noise_seed_delta: {self.eta_noise_seed_delta} must be >= 0")
        if self.clip_skip < 1:
            raise EngineError(f"clip_skip: {self.clip_skip} must be >= 1")
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
        if self.mask is not None:
            if self.init_image is None:
                raise EngineError("mask: inpainting needs an init_image")
            if tuple(self.mask.size) != (self.width, self.height):
                w, h = self.mask.size
                raise EngineError(
                    f"mask: {w}x{h}, not the batch's {self.width}x{self.height} (resize it first)"
                )
        if self.masked_content not in MASKED_CONTENT:
            raise EngineError(
                f"masked_content: {self.masked_content!r} is not one of {', '.join(MASKED_CONTENT)}"
            )
        if self.hires is not None:
            if self.init_image is not None:
                raise EngineError("hires: a hires fix is for txt2img, not with an init_image")
            self.hires.validate(self.width, self.height, multiple)
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


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's ``slerp`` (``modules/processing.py``), as it is applied there: to one image's
    noise tensors ``low`` and ``high`` of shape (C, H, W), normalised along dim 1 and
    interpolated per (C, W) column; ``val`` 0 gives ``low``, 1 gives ``high``."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        # near parallel: A1111's linear fallback, whose weights are the other way round
        # from the slerp below (val weighs low); kept as A1111 has it
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (
        torch.sin(val * omega) / so
    ).unsqueeze(1) * high


def first_noise(
    images: Sequence[ImageRequest],
    shape: Sequence[int],
    gens: list[torch.Generator],
    resized_from: tuple[int, int] | None = None,
) -> Tensor:
    """The batch's initial noise (N, *shape): each image's ``randn(shape)`` from its own
    generator ``gens[i]``, which that draw advances exactly as without a variation seed
    (its later, ancestral, noise is the same), then, for a ``subseed_strength`` s != 0,
    ``slerp(s, noise, randn(shape))`` toward the noise of a fresh CPU generator of its
    ``subseed`` (A1111's variation seed; s 0 leaves the noise bit for bit the seed's).

    ``resized_from`` (height, width in latents; ``BatchRequest.seed_noise_size``) is
    A1111's seed resize: the seed's (and subseed's) noise is drawn at that size from fresh
    generators, slerp'd, and set into the middle of the image's own draw (cropped to its
    middle where it is larger), as A1111's ``ImageRNG.first`` places it."""
    import torch

    drawn = tuple(shape) if resized_from is None else (shape[0], *resized_from)
    out = []
    for image, gen in zip(images, gens, strict=True):
        if resized_from is None:
            noise = torch.randn(shape, generator=gen)
        else:
            noise = torch.randn(drawn, generator=torch.Generator("cpu").manual_seed(image.seed))
        if image.subseed_strength != 0:
            sub_gen = torch.Generator("cpu").manual_seed(image.subseed)
            noise = slerp(image.subseed_strength, noise, torch.randn(drawn, generator=sub_gen))
        if resized_from is not None:
            noise = _set_in_middle(noise, torch.randn(shape, generator=gen))
        out.append(noise)
    return torch.stack(out)


def ancestral_generators(batch: BatchRequest, gens: list[torch.Generator]) -> list[torch.Generator]:
    """The generators an image's ancestral noise comes from once its first noise is drawn
    from ``gens``: the same ones, or with A1111's ENSD new ones of ``seed + delta``."""
    import torch

    delta = batch.eta_noise_seed_delta
    if not delta:
        return gens
    return [torch.Generator("cpu").manual_seed(r.seed + delta) for r in batch.images]


def _set_in_middle(noise: Tensor, x: Tensor) -> Tensor:
    """``x`` (C, H, W) with ``noise`` (C, h, w) set into its middle, the middle of
    ``noise`` where it is the larger; A1111's offsets, rounded down as there."""
    (_, big_h, big_w), (_, h0, w0) = x.shape, noise.shape
    dx, dy = (big_w - w0) // 2, (big_h - h0) // 2
    w = w0 if dx >= 0 else w0 + 2 * dx
    h = h0 if dy >= 0 else h0 + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return x


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
