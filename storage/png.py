"""PNG encoding with an AUTOMATIC1111-style ``parameters`` text chunk.

The text has the layout A1111 writes and existing tools (A1111/Forge "PNG Info",
civitai, image browsers) read::

    a prompt, possibly
    on several lines
    Negative prompt: the negative prompt
    Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123,
    Size: 512x512, Model hash: abcdef1234, Model: name   (one line in the file)

Values holding ``,``, ``:`` or a newline are JSON-quoted, as A1111's ``quote`` does.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"

# A1111's parser: `Key: value` pairs, value either JSON-quoted or up to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_EXTRA_KEY = re.compile(r"\w[\w \-/]*\w")
_NEGATIVE = "Negative prompt:"

# field name in the text -> (argument name, converter)
_FIELDS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
}
RESERVED_KEYS = frozenset(_FIELDS) | {"Size"}


def _quote(value: object) -> str:
    """A1111's quote, plus quoting of values that start with '"' or have outer spaces."""
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def format_parameters(
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler_name: str,
    scheduler: str | None,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The A1111 infotext for one image. ``model_hash`` may be a full sha256: A1111 shows
    its first 10 hex characters. ``scheduler`` None or "" omits ``Schedule type``."""
    params: dict[str, str] = {"Steps": str(int(steps)), "Sampler": _quote(sampler_name)}
    if scheduler:
        params["Schedule type"] = _quote(scheduler)
    params["CFG scale"] = _number(cfg_scale)
    params["Seed"] = str(int(seed))
    params["Size"] = f"{int(width)}x{int(height)}"
    if model_hash:
        params["Model hash"] = _quote(model_hash[:10])
    params["Model"] = _quote(model)
    for key, value in (extra or {}).items():
        if key in RESERVED_KEYS or not _RE_EXTRA_KEY.fullmatch(key):
            raise ValueError(
                f"invalid extra parameter name {key!r}: needs 2+ word characters, spaces, "
                f"'-' or '/', and none of {sorted(RESERVED_KEYS)}"
            )
        if value is not None:
            params[key] = _quote(value)
    last_line = ", ".join(f"{k}: {v}" for k, v in params.items())
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{last_line}".strip()


def parse_parameters(text: str) -> dict[str, Any]:
    """Invert :func:`format_parameters`; also reads infotexts written by A1111 itself.

    Returns the keyword arguments of format_parameters (missing fields are None,
    ``negative_prompt`` "" and ``extra`` {}), extra values as strings. A field with a
    malformed number raises ValueError naming it.
    """
    result: dict[str, Any] = {arg: None for arg, _ in _FIELDS.values()}
    result.update(prompt="", negative_prompt="", width=None, height=None, extra={})
    result["prompt"], result["negative_prompt"], pairs = _split_infotext(text)
    for key, value in pairs:
        if key == "Size" and (m := _RE_SIZE.match(value)):
            result["width"], result["height"] = int(m.group(1)), int(m.group(2))
        elif key in _FIELDS:
            arg, convert = _FIELDS[key]
            try:
                result[arg] = convert(value)
            except ValueError:
                raise ValueError(f"invalid value {value!r} for {key!r} in parameters") from None
        else:
            result["extra"][key] = value
    return result


def _split_infotext(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """An infotext's prompt, negative prompt and the (key, value) pairs of its last line
    (unquoted), as A1111 splits it: the last line holds the pairs when it has 3 or more."""
    *lines, last_line = text.strip().split("\n")
    if len(_RE_PARAM.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith(_NEGATIVE):
            negative = [line[len(_NEGATIVE) :].lstrip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    pairs = [(key, _unquote(raw.strip())) for key, raw in _RE_PARAM.findall(last_line)]
    return "\n".join(prompt).strip(), "\n".join(negative).strip() if negative else "", pairs


def infotext_fields(text: str) -> dict[str, str]:
    """An infotext's fields by A1111's own names, as its ``/sdapi/v1/png-info`` gives them:
    "Prompt", "Negative prompt", each key of the last line with its value as text, and
    "Size" also as "Size-1" and "Size-2" (width, height)."""
    prompt, negative, pairs = _split_infotext(text)
    out = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        out[key] = value
        if key == "Size" and (m := _RE_SIZE.match(value)):
            out["Size-1"], out["Size-2"] = m.group(1), m.group(2)
    return out


def encode_png(image: Image.Image, parameters: str, *, compress_level: int = 6) -> bytes:
    """PNG bytes of ``image`` with ``parameters`` in a tEXt chunk (iTXt if not Latin-1)."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def read_parameters(png_bytes: bytes) -> str | None:
    """The ``parameters`` text of a PNG, or None when it has none."""
    with Image.open(io.BytesIO(png_bytes)) as im:
        value = im.info.get(PARAMETERS_KEY)
        if value is None and hasattr(im, "text"):  # chunk placed after the image data
            value = im.text.get(PARAMETERS_KEY)
    return None if value is None else str(value)
