"""Input pictures for img2img: ``POST /v1/inputs`` stores one, a job names it by hash.

A job spec stays small (it is stored in Redis and cached by the scheduler), so a picture is
uploaded once, on its own: the request body is the image file itself (PNG, JPEG or WebP;
any ``Content-Type``, Pillow tells the format from the bytes), at most ``MAX_INPUT_BYTES``
bytes (413 otherwise) and ``MAX_INPUT_SIDE`` pixels a side (422). It is decoded, turned
upright by its EXIF orientation, its transparency laid on white (A1111's default
``img2img_background_color``), and stored as an RGB PNG under ``inputs/<sha256>.png``, the
sha256 being that of the stored PNG's bytes. The answer, ``{"init_image": sha256, "width",
"height"}``, is what a job's ``init_image`` names; the same picture uploaded twice gives the
same hash and one object.

A mask for inpainting is uploaded the same way with ``?mask=true``: it is read as A1111 reads
one, the alpha of a picture with transparency (opaque is repainted), else its grey levels
(white, above half grey, is repainted), and stored as grey RGB.

At submit, ``check_init_image`` makes sure the job's picture (and mask) is in the store and
its models can start from a picture (``IMG2IMG_ENGINES``): a FieldError naming the field
otherwise;
``check_hires`` does the same for a job's hires fix, whose second pass is an img2img.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

import storage
from farm.api.errors import FieldError, SafeJSONResponse
from farm.api.schemas import ErrorBody
from farm.spec import JobSpec
from storage.keys import input_key

if TYPE_CHECKING:
    from PIL import Image

    from farm.api.app import Farm

MAX_INPUT_BYTES = 32 * 1024 * 1024  # an uploaded file
MAX_INPUT_SIDE = 4096  # pixels, each side
FORMATS = ("PNG", "JPEG", "WEBP")
IMG2IMG_ENGINES = ("sd1", "sdxl")  # the engines whose models start from a picture
BACKGROUND = (255, 255, 255)  # what transparent parts become (A1111's default)
FIELD = "image"  # what errors about the uploaded body name


class InputPicture(BaseModel):
    init_image: str = Field(description="the sha256 to give a job as its init_image")
    width: int = Field(description="the picture's width in pixels, as stored")
    height: int = Field(description="its height")


def decode_picture(data: bytes, field: str = FIELD, mask: bool = False) -> Image.Image:
    """The RGB picture in ``data`` (PNG, JPEG or WebP; its first frame if animated),
    upright by its EXIF orientation and with transparency laid on white. FieldError naming
    ``field`` for anything that is not such a picture or is over the limits. ``mask``: an
    inpainting mask, as A1111 reads one: a picture with transparency is its alpha (opaque:
    repainted), any other its grey levels; RGB all the same."""
    from PIL import Image, ImageOps

    if len(data) > MAX_INPUT_BYTES:
        raise FieldError(field, f"{len(data)} bytes; at most {MAX_INPUT_BYTES}", 413)
    if not data:
        raise FieldError(field, "is empty: send a PNG, JPEG or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                w, h = im.size
                if not (1 <= w <= MAX_INPUT_SIDE and 1 <= h <= MAX_INPUT_SIDE):
                    raise FieldError(
                        field,
                        f"the picture is {w}x{h}; at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}",
                    )
                im.seek(0)
                im.load()
                picture = ImageOps.exif_transpose(im)
                if mask:
                    return mask_levels(picture).convert("RGB")
                if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
                    rgba = picture.convert("RGBA")
                    flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
                    flat.alpha_composite(rgba)
                    return flat.convert("RGB")
                return picture.convert("RGB")
    except FieldError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise FieldError(
            field, f"too many pixels; at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}"
        ) from None
    except Exception as exc:  # Pillow raises many kinds for bad data
        raise FieldError(
            field, f"not a PNG, JPEG or WebP picture that decodes ({type(exc).__name__}: {exc})"
        ) from None


def mask_levels(picture: Image.Image) -> Image.Image:
    """A mask's grey levels (mode "L"), as A1111's ``create_binary_mask`` reads them: the
    alpha of a picture with transparency (not all opaque), thresholded (above 128: 255),
    else its grey levels as they are."""
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        alpha = picture.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a > 128 else 0)
    return picture.convert("L")


def encode_picture(picture: Image.Image) -> tuple[str, bytes]:
    """The stored form of a picture: its PNG bytes (no metadata) and their sha256."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def prepare(
    data: bytes, field: str = FIELD, mask: bool = False
) -> tuple[str, bytes, tuple[int, int]]:
    """``decode_picture`` then ``encode_picture``: (sha256, PNG bytes, (width, height))."""
    picture = decode_picture(data, field, mask)
    sha, png = encode_picture(picture)
    return sha, png, picture.size


def put_input(store: storage.ObjectStore, sha: str, png: bytes) -> None:
    """Store the PNG under its key unless it is there already; 503 if the store is away."""
    key = input_key(sha)
    try:
        if not store.exists(key):
            store.put_bytes(key, png, "image/png")
    except storage.StorageError as exc:
        raise HTTPException(503, f"object storage is unavailable: {exc}") from None


def check_img2img_models(farm: Farm, spec: JobSpec, field: str, what: str) -> None:
    """Each of the job's models can sample from a picture (img2img and the hires fix's
    second pass): FieldError naming ``field`` and saying that the model cannot ``what``."""
    for name in dict.fromkeys([spec.model, *spec.sweep.get("model", [])]):
        entry = farm.models.get(name)
        if entry is not None and entry.engine not in IMG2IMG_ENGINES:
            raise FieldError(
                field,
                f"model {name!r} ({entry.engine}) cannot {what}; it goes with "
                f"{' or '.join(f'{e} models' for e in IMG2IMG_ENGINES)}",
            )


def check_hires(farm: Farm, spec: JobSpec) -> None:
    """A job's ``hires`` fix goes with models that take img2img (its second pass is one)."""
    if spec.hires is not None:
        check_img2img_models(farm, spec, "hires", "render a hires fix (img2img at the larger size)")


def check_init_image(farm: Farm, spec: JobSpec) -> None:
    """A job's ``init_image`` (and its inpainting mask) is a stored input and each of its
    models takes one."""
    if not spec.init_image:
        return
    check_img2img_models(farm, spec, "init_image", "start from a picture (img2img)")
    _check_stored(farm, "init_image", spec.init_image)
    if spec.inpaint is not None:
        _check_stored(farm, "inpaint.mask", spec.inpaint.mask)


def _check_stored(farm: Farm, field: str, sha: str) -> None:
    """The input picture ``sha`` is in the store: a FieldError naming ``field`` if not."""
    try:
        found = farm.store().exists(input_key(sha))
    except storage.StorageError as exc:
        raise HTTPException(503, f"object storage is unavailable: {exc}") from None
    if not found:
        raise FieldError(
            field,
            f"no input picture {sha}: upload it first (POST /v1/inputs answers "
            "the sha256 to put here)",
        )


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, refused (413 naming ``image``) as soon as it is over ``limit``
    (``MAX_INPUT_BYTES``) bytes, also when it comes without a Content-Length."""
    limit = MAX_INPUT_BYTES if limit is None else limit
    chunks: list[bytes] = []
    got = 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise FieldError(FIELD, f"over {limit} bytes; at most {limit}", 413)
        chunks.append(chunk)
    return b"".join(chunks)


_BINARY = {"schema": {"type": "string", "format": "binary"}}


def router(farm: Farm) -> APIRouter:
    """``POST /v1/inputs`` over ``farm``'s store."""
    api = APIRouter()

    @api.post(
        "/v1/inputs",
        status_code=201,
        response_model=InputPicture,
        responses={
            413: {"model": ErrorBody, "description": "the file is too large"},
            422: {"model": ErrorBody, "description": "not a picture, or too large a one"},
            503: {"model": ErrorBody, "description": "object storage is unavailable"},
        },
        summary="Upload an input picture (img2img); a job names it in init_image",
        description=(
            "The body is the image file itself, PNG, JPEG or WebP (curl: `--data-binary "
            f"@in.png`), at most {MAX_INPUT_BYTES} bytes and {MAX_INPUT_SIDE} pixels a side. "
            "It is stored as an RGB PNG (EXIF orientation applied, transparency on white); "
            "the answer's init_image is the sha256 of that PNG. With `?mask=true` it is an "
            "inpainting mask (a job's inpaint.mask), read as A1111 reads one: the alpha of a "
            "picture with transparency (opaque: repainted), else its grey levels (white: "
            "repainted)."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/png": _BINARY,
                    "image/jpeg": _BINARY,
                    "image/webp": _BINARY,
                    "application/octet-stream": _BINARY,
                },
            }
        },
    )
    async def upload(
        request: Request,
        mask: bool = Query(
            False, description="an inpainting mask: its alpha where it has transparency"
        ),
    ) -> Response:
        data = await read_body(request)
        sha, png, (w, h) = await run_in_threadpool(prepare, data, FIELD, mask)
        await run_in_threadpool(lambda: put_input(farm.store(), sha, png))
        body: dict[str, Any] = {"init_image": sha, "width": w, "height": h}
        return SafeJSONResponse(body, status_code=201)

    return api
