"""A1111's inpainting geometry for normal (non-inpainting) models, torch-free (PIL + numpy):
the mask and picture preparation of ``StableDiffusionProcessingImg2Img.init`` for
whole-picture and "only masked" inpainting, and ``apply_overlay`` afterwards; resize
mode 0 ("Just resize") only.

- ``prepare`` turns an init picture and a mask into what the engine needs: the picture the
  VAE encodes (width x height, the masked part filled with blurred colours for "fill",
  "latent noise" and "latent nothing"), the mask whose latent-size copy (``latent_mask``)
  says where to repaint, the overlay that puts the kept part of the init picture back, the
  place an "only masked" render is pasted to, and the infotext entries A1111 writes.
- The mask, as A1111 reads it (``create_binary_mask``, mask_round on): an RGBA picture
  whose alpha is not all opaque is its alpha channel, thresholded at 128; any other picture
  is its ``convert("L")`` greys, kept as they are. White is repainted; ``invert`` swaps.
- The mask is blurred with A1111's Gaussian (sigma ``blur``, kernel
  ``2*int(2.5*blur+0.5)+1``, first along x then along y, each pass rounded to 8 bits).
- Whole picture: picture and mask resized to width x height; the overlay keeps the init
  picture where the doubled mask is below 255, fully where the mask is 0.
- Only masked: the bounding box of the mask's non-zero pixels, grown by ``padding``, widened
  to the render's aspect ratio (``expand_crop_region``), is cut from the init picture and the
  mask and resized (mode 2, "resize and fill") to width x height; ``finish`` resizes the
  render back (mode 1, "crop and resize") into that box of the full-size init picture. A
  blank mask falls back to plain img2img (no mask, no overlay), as in A1111.

Deviations from A1111:

- The blur is computed in floating point (kernel ``exp(-(i-c)^2 / (2 sigma^2))``,
  normalised, OpenCV's default border BORDER_REFLECT_101, rounded to nearest). OpenCV's
  ``GaussianBlur`` on 8-bit pictures runs in fixed point with kernel weights rounded to
  1/256, so A1111's mask may differ from this one by a grey level here and there.
- A mask of another size than the init picture: for whole-picture inpainting it is
  resized straight to width x height, as in A1111; for "only masked" the blurred mask is
  first resized (mode 0) to the init picture's size, so the crop region is one of the init
  picture (A1111 takes the region in the mask's pixels and cuts it from the init picture).
- ``resize_image`` mode 2 skips a filling band of zero pixels (A1111's PIL call raises).
- No upscaler: every resize is PIL's LANCZOS, as A1111 with ``upscaler_for_img2img`` unset.
  An init picture with alpha is flattened onto white (A1111's default
  ``img2img_background_color``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from workers.engine.names import MASKED_CONTENT

__all__ = [
    "INPAINT_FILLS",
    "Prepared",
    "binary_mask",
    "blur_mask",
    "crop_region",
    "expand_crop_region",
    "fill",
    "finish",
    "latent_mask",
    "prepare",
    "resize_image",
]

INPAINT_FILLS = MASKED_CONTENT  # A1111's inpainting_fill 0..3

_LANCZOS = Image.Resampling.LANCZOS
_THRESHOLD = [0] * 129 + [255] * 127  # point() table: 255 where a value is above 128
# (blur radius, times composited) of masking.fill, in A1111's order: coarse to fine
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
_BACKGROUND = "#ffffff"  # A1111's img2img_background_color default


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's ``create_binary_mask`` (round on): the alpha channel of an RGBA picture that is
    not fully opaque, each pixel 255 above 128 and 0 otherwise; else ``convert("L")``, whose
    greys A1111 keeps as they are. Mode "L"."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(_THRESHOLD)
    return mask.convert("L")


def _reflect_101(n: int, before: int, after: int) -> np.ndarray:
    """Indices into a side of ``n`` pixels for positions ``-before .. n + after - 1`` with
    OpenCV's BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), reflected again as often as a
    kernel longer than the side needs."""
    positions = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded >= n, period - folded, folded)


def _gaussian_pass(values: np.ndarray, sigma: int, axis: int) -> np.ndarray:
    """One pass of A1111's mask blur along ``axis`` (1: x, 0: y), rounded to uint8."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    half = size // 2
    offsets = np.arange(size, dtype=np.float64) - half
    kernel = np.exp(-(offsets**2) / (2.0 * float(sigma) ** 2))
    kernel /= kernel.sum()
    n = values.shape[axis]
    padded = np.take(values.astype(np.float64), _reflect_101(n, half, half), axis=axis)
    total = np.zeros(values.shape, dtype=np.float64)
    for tap, weight in enumerate(kernel):
        window = padded[:, tap : tap + n] if axis == 1 else padded[tap : tap + n, :]
        total += weight * window
    return np.clip(np.rint(total), 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: ``cv2.GaussianBlur(mask, (k, 1), blur_x)`` then
    ``cv2.GaussianBlur(mask, (1, k), blur_y)`` with ``k = 2*int(2.5*blur+0.5)+1``, re-done in
    numpy (float arithmetic; see the module's deviations); 0 on an axis leaves it. Mode "L"."""
    if blur_x < 0 or blur_y < 0:
        raise ValueError(f"blur must be >= 0, got blur_x={blur_x}, blur_y={blur_y}")
    values = np.asarray(mask.convert("L"), dtype=np.uint8)
    if blur_x > 0:
        values = _gaussian_pass(values, blur_x, axis=1)
    if blur_y > 0:
        values = _gaussian_pass(values, blur_y, axis=0)
    return Image.fromarray(np.ascontiguousarray(values))


def resize_image(mode: int, im: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's ``images.resize_image`` without an upscaler (LANCZOS).

    0, just resize: to width x height, keeping ``im.mode``.
    1, crop and resize: scaled to cover width x height, centred, the excess cut off.
    2, resize and fill: scaled to fit inside, centred, the empty bands filled by stretching
    the picture's edge rows (or columns).
    Modes 1 and 2 paste into a new RGB picture, as A1111 does."""
    if mode == 0:
        return im.resize((width, height), resample=_LANCZOS)
    if mode not in (1, 2):
        raise ValueError(f"resize mode must be 0, 1 or 2, got {mode!r}")
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=_LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == 2:
        if ratio < src_ratio:  # bands above and below: the top and bottom rows stretched
            band = height // 2 - src_h // 2
            if band > 0:
                top = resized.resize((width, band), box=(0, 0, width, 0))
                bottom = resized.resize((width, band), box=(0, src_h, width, src_h))
                out.paste(top, box=(0, 0))
                out.paste(bottom, box=(0, band + src_h))
        elif ratio > src_ratio:  # bands left and right: the edge columns stretched
            band = width // 2 - src_w // 2
            if band > 0:
                left = resized.resize((band, height), box=(0, 0, 0, height))
                right = resized.resize((band, height), box=(src_w, 0, src_w, height))
                out.paste(left, box=(0, 0))
                out.paste(right, box=(band + src_w, 0))
    return out


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """A1111's ``masking.get_crop_region_v2``: the box (x1, y1, x2, y2) around the mask's
    non-zero pixels, grown by ``pad`` on each side within the picture; None for a blank mask."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def _grow_span(lo: int, hi: int, grow: int, size: int) -> tuple[int, int]:
    """One side of ``expand_crop_region``: [lo, hi) grown by ``grow`` about its centre,
    shifted back inside [0, size) where it overhangs the far edge, then the near one, and
    cut at the far edge where it is larger than ``size``."""
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= size:
        lo -= hi - size
        hi = size
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, size)


def expand_crop_region(
    region: tuple[int, int, int, int],
    processing_width: int,
    processing_height: int,
    image_width: int,
    image_height: int,
) -> tuple[int, int, int, int]:
    """A1111's ``masking.expand_crop_region``: the region widened (or heightened) about its
    centre to the aspect ratio of the render, shifted back inside the picture where it
    overhangs an edge and cut at the far edge where it is larger than the picture."""
    x1, y1, x2, y2 = region
    ratio_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_region > ratio_processing:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _masked_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in _FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's ``masking.fill``: the kept part (mask 0) premultiplied, blurred with radii 256,
    64, 16, 4, 2 and 0 and composited coarse to fine, so that the masked part takes the
    colours around it and the kept part stays as it was. RGB."""
    return _masked_fill(image, mask)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` makes of an init picture and its mask."""

    picture: Image.Image  # RGB, width x height: what the VAE encodes
    mask: Image.Image | None  # "L", width x height: the latent mask's source (1 = repaint)
    overlay: Image.Image | None  # RGBA: the init picture where kept, transparent where repainted
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) of an "only masked" render
    params: dict[str, Any]  # the infotext entries A1111 writes, in its order


def _flatten(image: Image.Image) -> Image.Image:
    """A1111's ``images.flatten``: an RGBA picture composited onto the background colour."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, _BACKGROUND)
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def _overlay(picture: Image.Image, repaint: Image.Image) -> Image.Image:
    """The picture premultiplied through the inverted mask, as RGBA: opaque where the mask
    is 0, transparent where it is 255."""
    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(repaint.convert("L")))
    return kept.convert("RGBA")


def _check(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def prepare(
    init: Image.Image,
    mask: Image.Image,
    width: int,
    height: int,
    *,
    blur: int = 4,
    fill: int = 1,
    invert: bool = False,
    full_res: bool = False,
    padding: int = 0,
) -> Prepared:
    """A1111's img2img mask path (resize mode 0, mask_round on, mask blur ``blur`` on both
    axes). ``fill`` indexes ``INPAINT_FILLS``; ``full_res`` is "Inpaint area: Only masked"
    with ``padding`` its "Masked area padding"."""
    _check("width", width, 1)
    _check("height", height, 1)
    _check("blur", blur, 0)
    _check("fill", fill, 0, len(INPAINT_FILLS) - 1)
    _check("padding", padding, 0)
    image = _flatten(init)
    params: dict[str, Any] = {}

    repaint = binary_mask(mask)
    if invert:
        repaint = ImageOps.invert(repaint)
        params["Mask mode"] = "Inpaint not masked"
    repaint = blur_mask(repaint, blur, blur)
    if blur > 0:
        params["Mask blur"] = blur

    paste_to = None
    if full_res:
        if repaint.size != image.size:
            repaint = resize_image(0, repaint, image.width, image.height)
        region = crop_region(repaint, padding)
        if region is None:  # blank mask: A1111 falls back to plain img2img
            picture = resize_image(0, image, width, height)
            return Prepared(picture, None, None, None, params)
        region = expand_crop_region(region, width, height, repaint.width, repaint.height)
        x1, y1, x2, y2 = region
        source = resize_image(2, repaint.crop(region), width, height).convert("L")
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        params["Inpaint area"] = "Only masked"
        params["Masked area padding"] = padding
        overlay = _overlay(image, repaint)
        picture = resize_image(2, image.crop(region), width, height)
    else:
        source = resize_image(0, repaint, width, height)
        doubled = np.clip(np.asarray(source, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        picture = resize_image(0, image, width, height)
        overlay = _overlay(picture, Image.fromarray(doubled))

    if fill != 1:
        picture = _masked_fill(picture, source)
        params["Masked content"] = INPAINT_FILLS[fill]
    return Prepared(picture, source, overlay, paste_to, params)


def latent_mask(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """A1111's latent mask: the mask resized (PIL's default resample) to the latent's
    height x width, its first channel / 255, rounded: float32, 1.0 where to repaint."""
    small = mask.convert("RGB").resize((width, height))
    values = np.asarray(small, dtype=np.float32)[..., 0] / 255
    return np.around(values).astype(np.float32)


def finish(image: Image.Image, prepared: Prepared) -> Image.Image:
    """A1111's ``apply_overlay``: an "only masked" render resized (mode 1) into its box on a
    transparent picture of the init picture's size, then the overlay composited on top. RGB;
    without an overlay the image is returned as it is."""
    overlay = prepared.overlay
    if overlay is None:
        return image
    if prepared.paste_to is not None:
        x, y, w, h = prepared.paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    if image.size != overlay.size:
        raise ValueError(
            f"image is {image.width}x{image.height}, the overlay {overlay.width}x{overlay.height}"
        )
    out = image.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")
