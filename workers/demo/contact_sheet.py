"""A contact sheet: pictures in a grid, each with its prompt written under it."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

CELL_MIN = 192  # small pictures are scaled up (nearest neighbour) to at least this
PAD = 8
FONT_SIZE = 14


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def make_contact_sheet(
    images: list[Image.Image], cols: int, labels: list[str] | None = None
) -> Image.Image:
    """``images`` row by row, ``cols`` per row, each label wrapped under its picture.

    Pictures smaller than ``CELL_MIN`` are enlarged by a whole factor with nearest
    neighbour, so a 64x64 render stays sharp and the labels stay readable beside it.
    """
    if not images:
        raise ValueError("images: a contact sheet needs at least one image")
    if cols < 1:
        raise ValueError(f"cols: {cols} must be >= 1")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    scale = max(1, -(-CELL_MIN // max(w, h)))
    cw, ch = w * scale, h * scale
    font = _font(FONT_SIZE)
    line_h = FONT_SIZE + 4
    chars = max(8, int(cw / (FONT_SIZE * 0.55)))
    wrapped = [textwrap.wrap(label, chars) or [""] for label in labels] if labels else []
    text_h = max((len(lines) for lines in wrapped), default=0) * line_h
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new(
        "RGB", (cols * (cw + PAD) + PAD, rows * (ch + text_h + PAD) + PAD), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = PAD + c * (cw + PAD), PAD + r * (ch + text_h + PAD)
        cell = im.convert("RGB").resize(
            (im.width * scale, im.height * scale), Image.Resampling.NEAREST
        )
        sheet.paste(cell, (x + (cw - cell.width) // 2, y + (ch - cell.height) // 2))
        if wrapped:
            for k, line in enumerate(wrapped[i]):
                draw.text((x, y + ch + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return sheet
