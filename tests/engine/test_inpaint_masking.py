"""A1111's inpainting geometry (``workers.engine.inpaint``), torch-free: the binary mask, the
Gaussian mask blur against a direct sum with OpenCV's reflect-101 border, A1111's resize
modes, the crop region and its expansion to the render's aspect ratio, the masked fill, the
whole-picture and only-masked preparation with its infotext entries, the latent mask and
the overlay put back by ``finish``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from workers.engine.inpaint import (
    INPAINT_FILLS,
    binary_mask,
    blur_mask,
    crop_region,
    expand_crop_region,
    fill,
    finish,
    latent_mask,
    prepare,
    resize_image,
)


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- binary_mask ---------------------------------------------------------------------------


def test_binary_mask_rgb_and_l_are_their_greys():
    rgb = Image.fromarray(np.array([[[255, 255, 255], [0, 0, 0], [200, 100, 50]]], np.uint8))
    out = binary_mask(rgb)
    assert out.mode == "L"
    assert arr(out).tolist() == arr(rgb.convert("L")).tolist()
    assert arr(out)[0, :2].tolist() == [255, 0]
    grey = Image.fromarray(np.array([[0, 100, 128, 129, 255]], np.uint8))
    # A1111 thresholds only an alpha mask; an L mask keeps its greys
    assert arr(binary_mask(grey)).tolist() == [[0, 100, 128, 129, 255]]


def test_binary_mask_rgba_takes_alpha_thresholded_at_128():
    pixels = np.zeros((1, 5, 4), np.uint8)
    pixels[..., :3] = 255  # white colours, which convert("L") would read as "repaint"
    pixels[0, :, 3] = [0, 127, 128, 129, 255]
    out = binary_mask(Image.fromarray(pixels, "RGBA"))
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 0, 0, 255, 255]]


def test_binary_mask_opaque_rgba_uses_its_colours():
    pixels = np.full((1, 2, 4), 255, np.uint8)
    pixels[0, 0, :3] = 0
    out = binary_mask(Image.fromarray(pixels, "RGBA"))
    assert arr(out).tolist() == [[0, 255]]


# --- blur_mask -----------------------------------------------------------------------------


def reflect_101(p: int, n: int) -> int:
    """OpenCV's borderInterpolate for BORDER_REFLECT_101, folded as often as needed."""
    if n == 1:
        return 0
    while not 0 <= p < n:
        p = -p if p < 0 else 2 * (n - 1) - p
    return p


def direct_pass(values: np.ndarray, sigma: int, along_x: bool) -> np.ndarray:
    size = 2 * int(2.5 * sigma + 0.5) + 1
    c = (size - 1) / 2
    weights = [math.exp(-((i - c) ** 2) / (2 * sigma * sigma)) for i in range(size)]
    norm = sum(weights)
    h, w = values.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            acc = 0.0
            for i, weight in enumerate(weights):
                d = i - size // 2
                if along_x:
                    acc += weight * float(values[y, reflect_101(x + d, w)])
                else:
                    acc += weight * float(values[reflect_101(y + d, h), x])
            out[y, x] = min(255, max(0, round(acc / norm)))
    return out


@pytest.mark.parametrize(("shape", "blur_x", "blur_y"), [((9, 14), 1, 2), ((5, 7), 3, 3)])
def test_blur_mask_matches_a_direct_sum(shape, blur_x, blur_y):
    # (5, 7) with blur 3: the 17-tap kernel is longer than both sides
    rng = np.random.default_rng(1)
    values = (rng.random(shape) > 0.5).astype(np.uint8) * 255
    values[0, 0] = 90
    expected = direct_pass(direct_pass(values, blur_x, True), blur_y, False)
    out = blur_mask(Image.fromarray(values), blur_x, blur_y)
    assert out.mode == "L"
    assert out.size == (shape[1], shape[0])
    np.testing.assert_array_equal(arr(out), expected)
    assert not np.array_equal(arr(out), values)


def test_blur_mask_is_symmetric_and_zero_leaves_an_axis():
    dot = np.zeros((15, 15), np.uint8)
    dot[7, 7] = 255
    dot[6:9, 7] = 255
    dot[7, 6:9] = 255
    out = arr(blur_mask(Image.fromarray(dot), 2, 2))
    np.testing.assert_array_equal(out, out[::-1, :])
    np.testing.assert_array_equal(out, out[:, ::-1])
    np.testing.assert_array_equal(out, out.T)
    assert out[7, 7] < 255 and out[7, 10] > 0

    np.testing.assert_array_equal(arr(blur_mask(Image.fromarray(dot), 0, 0)), dot)
    stripe = np.zeros((12, 10), np.uint8)
    stripe[4:7, :] = 255  # constant along x: the x pass keeps it, the y pass does not
    np.testing.assert_array_equal(arr(blur_mask(Image.fromarray(stripe), 3, 0)), stripe)
    assert not np.array_equal(arr(blur_mask(Image.fromarray(stripe), 0, 3)), stripe)
    with pytest.raises(ValueError, match="blur"):
        blur_mask(Image.fromarray(stripe), -1, 0)


# --- resize_image --------------------------------------------------------------------------


def test_resize_image_mode_0_keeps_the_mode():
    out = resize_image(0, Image.new("L", (30, 20), 77), 12, 18)
    assert (out.mode, out.size) == ("L", (12, 18))
    assert arr(out).min() == arr(out).max() == 77


def test_resize_image_mode_1_covers_and_crops_the_excess():
    src = np.zeros((100, 200, 3), np.uint8)
    src[:, :50] = (0, 255, 0)  # outer quarters: cut off
    src[:, 150:] = (0, 255, 0)
    src[:, 50:100] = (255, 0, 0)
    src[:, 100:150] = (0, 0, 255)
    out = resize_image(1, Image.fromarray(src), 100, 100)
    assert (out.mode, out.size) == ("RGB", (100, 100))
    a = arr(out)
    assert a[:, :, 1].max() < 40  # no green
    assert (a[:, 5, 0] > 200).all() and (a[:, 95, 2] > 200).all()

    tall = resize_image(1, Image.fromarray(src), 50, 100)  # cover 50x100: scaled to 200x100
    assert tall.size == (50, 100)
    assert (arr(tall)[:, :20, 0] > 200).all() and (arr(tall)[:, 30:, 2] > 200).all()


def test_resize_image_mode_2_fits_and_fills_the_bands():
    wide = np.full((50, 100, 3), 128, np.uint8)
    wide[0] = (255, 0, 0)
    wide[-1] = (0, 0, 255)
    out = resize_image(2, Image.fromarray(wide), 100, 100)
    a = arr(out)
    assert (out.mode, out.size) == ("RGB", (100, 100))
    # the picture lands in rows 25..74; the bands above and below repeat its edge rows
    assert (a[:26] == (255, 0, 0)).all()
    assert (a[30:70] == 128).all()
    assert (a[74:] == (0, 0, 255)).all()

    tall = np.full((100, 50, 3), 128, np.uint8)
    tall[:, 0] = (255, 0, 0)
    tall[:, -1] = (0, 0, 255)
    b = arr(resize_image(2, Image.fromarray(tall), 100, 100))
    assert (b[:, :26] == (255, 0, 0)).all()
    assert (b[:, 30:70] == 128).all()
    assert (b[:, 74:] == (0, 0, 255)).all()

    # a band of one row is filled; one of no rows is left out (A1111's PIL call would raise)
    thin = np.full((49, 100, 3), 128, np.uint8)
    thin[0] = (255, 0, 0)
    c = arr(resize_image(2, Image.fromarray(thin), 100, 50))
    assert (c[0] == (255, 0, 0)).all() and (c[1] == (255, 0, 0)).all() and (c[49] == 128).all()
    assert resize_image(2, Image.fromarray(wide), 100, 51).size == (100, 51)

    grey = resize_image(2, Image.new("L", (40, 20), 200), 16, 16)
    assert grey.mode == "RGB"  # A1111 pastes into a new RGB picture
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(3, Image.new("L", (4, 4)), 8, 8)


# --- crop_region, expand_crop_region -------------------------------------------------------


def test_crop_region_with_pad_and_a_blank_mask():
    mask = Image.new("L", (20, 10), 0)
    mask.putpixel((3, 2), 255)
    mask.putpixel((7, 5), 1)
    assert crop_region(mask, 0) == (3, 2, 8, 6)
    assert crop_region(mask, 2) == (1, 0, 10, 8)
    assert crop_region(mask, 100) == (0, 0, 20, 10)
    assert crop_region(Image.new("L", (20, 10), 0), 4) is None


def test_expand_crop_region_to_the_render_ratio():
    assert expand_crop_region((10, 10, 30, 20), 64, 64, 100, 100) == (10, 5, 30, 25)
    assert expand_crop_region((10, 10, 20, 20), 128, 64, 100, 100) == (5, 10, 25, 20)
    rng = np.random.default_rng(2)
    for _ in range(50):
        x1, y1 = (int(v) for v in rng.integers(0, 200, 2))
        x2, y2 = x1 + int(rng.integers(1, 60)), y1 + int(rng.integers(1, 60))
        w, h = (int(v) for v in rng.choice([64, 96, 128], 2))
        ex1, ey1, ex2, ey2 = expand_crop_region((x1, y1, x2, y2), w, h, 400, 400)
        assert 0 <= ex1 <= x1 and x2 <= ex2 <= 400 and 0 <= ey1 <= y1 and y2 <= ey2 <= 400
        assert abs((ex2 - ex1) / (ey2 - ey1) - w / h) <= 1.5 / min(ey2 - ey1, ex2 - ex1)


def test_expand_crop_region_at_the_edges():
    # shifted up from the bottom edge, down from the top edge
    assert expand_crop_region((10, 90, 30, 100), 64, 64, 100, 100) == (10, 80, 30, 100)
    assert expand_crop_region((10, 0, 30, 10), 64, 64, 100, 100) == (10, 0, 30, 20)
    assert expand_crop_region((95, 10, 100, 30), 64, 64, 100, 100) == (80, 10, 100, 30)
    # larger than the picture: cut at the far edge, the ratio is not reached
    assert expand_crop_region((0, 0, 100, 30), 64, 64, 100, 30) == (0, 0, 100, 30)


# --- fill ----------------------------------------------------------------------------------


def test_fill_keeps_the_unmasked_part_and_takes_nearby_colours():
    src = np.zeros((64, 64, 3), np.uint8)
    src[:, :32] = (220, 30, 30)
    src[:, 32:] = (30, 30, 220)
    src[20:30, 8:18] = (0, 255, 0)  # a green patch on the red side, masked
    src[40:50, 44:54] = (0, 255, 0)  # and one on the blue side
    mask = box_mask((64, 64), (8, 20, 18, 30))
    mask.paste(255, (44, 40, 54, 50))
    out = fill(Image.fromarray(src), mask)
    assert (out.mode, out.size) == ("RGB", (64, 64))
    a, kept = arr(out), arr(mask) == 0
    np.testing.assert_array_equal(a[kept], src[kept])
    red, blue = a[25, 13].astype(int), a[45, 49].astype(int)
    assert red[1] < 100 and red[0] > red[2] + 100  # green gone, the red around it
    assert blue[1] < 100 and blue[2] > blue[0] + 100


# --- prepare -------------------------------------------------------------------------------


def test_prepare_whole_picture_overlay_is_the_doubled_mask():
    init = noise_picture(80, 60)
    mask = box_mask((80, 60), (20, 15, 50, 40))
    p = prepare(init, mask, 40, 32, blur=3)
    blurred = resize_image(0, blur_mask(binary_mask(mask), 3, 3), 40, 32)
    assert p.paste_to is None
    assert (p.picture.mode, p.picture.size) == ("RGB", (40, 32))
    assert (p.mask.mode, p.mask.size) == ("L", (40, 32))
    np.testing.assert_array_equal(arr(p.mask), arr(blurred))
    assert (p.overlay.mode, p.overlay.size) == ("RGBA", (40, 32))
    doubled = np.clip(arr(blurred).astype(np.float32) * 2, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(arr(p.overlay)[..., 3], 255 - doubled)
    resized = arr(resize_image(0, init, 40, 32))
    np.testing.assert_array_equal(p.picture, resized)  # fill 1, "original": untouched
    opaque = arr(p.overlay)[..., 3] == 255
    assert opaque.sum() > 100
    np.testing.assert_array_equal(arr(p.overlay)[..., :3][opaque], resized[opaque])
    assert p.params == {"Mask blur": 3}


def test_prepare_params_in_a1111_order():
    init, mask = noise_picture(64, 64), box_mask((64, 64), (20, 20, 40, 40))
    p = prepare(init, mask, 64, 64, blur=2, fill=2, invert=True)
    assert list(p.params.items()) == [
        ("Mask mode", "Inpaint not masked"),
        ("Mask blur", 2),
        ("Masked content", "latent noise"),
    ]
    p = prepare(init, mask, 64, 64, blur=4, fill=0, invert=True, full_res=True, padding=6)
    assert list(p.params.items()) == [
        ("Mask mode", "Inpaint not masked"),
        ("Mask blur", 4),
        ("Inpaint area", "Only masked"),
        ("Masked area padding", 6),
        ("Masked content", "fill"),
    ]
    assert prepare(init, mask, 64, 64, blur=0, fill=1).params == {}
    assert prepare(init, mask, 64, 64, fill=3).params["Masked content"] == "latent nothing"
    assert INPAINT_FILLS[3] == "latent nothing"


def test_prepare_invert_repaints_the_other_part():
    init, mask = noise_picture(32, 32), box_mask((32, 32), (8, 8, 24, 24))
    p = prepare(init, mask, 32, 32, blur=0, invert=True)
    assert p.mask.getpixel((16, 16)) == 0 and p.mask.getpixel((2, 2)) == 255
    assert p.overlay.getpixel((16, 16))[3] == 255 and p.overlay.getpixel((2, 2))[3] == 0


def test_prepare_fill_changes_only_the_masked_part():
    init, mask = noise_picture(48, 48, seed=3), box_mask((48, 48), (10, 10, 30, 30))
    plain = arr(resize_image(0, init, 48, 48))
    p = prepare(init, mask, 48, 48, blur=0, fill=3)
    kept = arr(p.mask) == 0
    np.testing.assert_array_equal(arr(p.picture)[kept], plain[kept])
    assert not np.array_equal(arr(p.picture)[~kept], plain[~kept])


def test_prepare_only_masked_crops_to_the_render_ratio():
    init = noise_picture(200, 100, seed=4)
    mask = box_mask((200, 100), (150, 20, 170, 40))
    p = prepare(init, mask, 64, 32, blur=0, full_res=True, padding=4)
    # (146, 16, 174, 44) widened to 2:1 about its centre
    assert p.paste_to == (132, 16, 56, 28)
    x, y, w, h = p.paste_to
    assert abs(w / h - 64 / 32) < 0.05
    assert (p.picture.mode, p.picture.size) == ("RGB", (64, 32))
    assert (p.mask.mode, p.mask.size) == ("L", (64, 32))
    assert (p.overlay.mode, p.overlay.size) == ("RGBA", (200, 100))
    expected = resize_image(2, init.crop((x, y, x + w, y + h)), 64, 32)
    np.testing.assert_array_equal(arr(p.picture), arr(expected))
    # the masked box's middle is white in the render's mask, its corners black
    assert p.mask.getpixel((32, 16)) == 255 and p.mask.getpixel((1, 1)) == 0
    alpha = arr(p.overlay)[..., 3]
    assert (alpha[25:35, 155:165] == 0).all()
    assert alpha[0, 0] == 255 and alpha[50, 100] == 255


def test_prepare_only_masked_with_a_mask_of_another_size():
    init = noise_picture(200, 100, seed=5)
    small = box_mask((100, 50), (75, 10, 85, 20))  # the same place at half size
    p = prepare(init, small, 64, 32, blur=0, full_res=True)
    x, y, w, h = p.paste_to
    assert x <= 150 and x + w >= 170 and y <= 20 and y + h >= 40
    assert p.overlay.size == init.size


def test_prepare_only_masked_blank_mask_falls_back_to_img2img():
    init = noise_picture(50, 40)
    p = prepare(init, Image.new("L", (50, 40), 0), 32, 32, full_res=True, fill=0, padding=8)
    assert p.mask is None and p.overlay is None and p.paste_to is None
    assert p.params == {"Mask blur": 4}
    np.testing.assert_array_equal(arr(p.picture), arr(resize_image(0, init, 32, 32)))
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    assert finish(image, p) is image


def test_prepare_flattens_an_rgba_init_onto_white():
    init = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    p = prepare(init, box_mask((16, 16), (4, 4, 8, 8)), 16, 16, blur=0)
    assert p.picture.mode == "RGB" and p.picture.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fill": 4}, "fill"),
        ({"fill": -1}, "fill"),
        ({"blur": -1}, "blur"),
        ({"padding": -2}, "padding"),
    ],
)
def test_prepare_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        prepare(noise_picture(8, 8), Image.new("L", (8, 8), 255), 8, 8, **kwargs)


# --- latent_mask ---------------------------------------------------------------------------


def test_latent_mask_rounds_to_zero_or_one():
    mask = Image.fromarray(np.array([[0, 127, 128, 255]] * 2, np.uint8))
    out = latent_mask(mask, 2, 4)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    assert out.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2
    half = box_mask((64, 32), (32, 0, 64, 32))
    small = latent_mask(half, 4, 8)  # height, width
    assert small.shape == (4, 8)
    assert small[:, :4].max() == 0.0 and small[:, 4:].min() == 1.0


# --- finish --------------------------------------------------------------------------------


def test_finish_whole_picture_keeps_the_init_where_the_overlay_is_opaque():
    init = noise_picture(48, 40, seed=6)
    p = prepare(init, box_mask((48, 40), (10, 10, 30, 30)), 48, 40, blur=2)
    generated = Image.new("RGB", (48, 40), (10, 200, 30))
    out = finish(generated, p)
    assert (out.mode, out.size) == ("RGB", (48, 40))
    alpha = arr(p.overlay)[..., 3]
    opaque, clear = alpha == 255, alpha == 0
    assert opaque.any() and clear.any() and ((alpha > 0) & (alpha < 255)).any()
    np.testing.assert_array_equal(arr(out)[opaque], arr(init)[opaque])
    np.testing.assert_array_equal(arr(out)[clear], arr(generated)[clear])


def test_finish_only_masked_pastes_back_at_full_size():
    init = noise_picture(200, 100, seed=7)
    mask = box_mask((200, 100), (150, 20, 170, 40))
    p = prepare(init, mask, 64, 48, blur=2, full_res=True, padding=1)
    x, y, w, h = p.paste_to
    assert w / h != 64 / 48  # a box a little off the render's ratio: resize modes 1, 2 differ
    expected = resize_image(2, init.crop((x, y, x + w, y + h)), 64, 48)
    np.testing.assert_array_equal(arr(p.picture), arr(expected))
    alpha = arr(p.overlay)[..., 3]
    # only masked: the overlay follows the blurred mask itself, not doubled
    np.testing.assert_array_equal(alpha, 255 - arr(blur_mask(mask, 2, 2)))
    generated = noise_picture(64, 48, seed=8)
    out = finish(generated, p)
    assert (out.mode, out.size) == ("RGB", init.size)
    opaque = alpha == 255
    np.testing.assert_array_equal(arr(out)[opaque], arr(init)[opaque])
    placed = np.zeros((100, 200, 3), np.uint8)
    placed[y : y + h, x : x + w] = arr(resize_image(1, generated, w, h))
    clear = alpha == 0
    assert clear[25:35, 155:165].all()
    np.testing.assert_array_equal(arr(out)[clear], placed[clear])
    with pytest.raises(ValueError):
        finish(Image.new("RGB", (10, 10)), prepare(init, init.convert("L"), 40, 20))
