"""Deterministic object keys: a re-run task writes exactly the same keys."""

from __future__ import annotations

import re

from storage.base import check_key

_SHA256 = re.compile(r"[0-9a-f]{64}")


def image_key(prefix: str, job_id: str, index: int, seed: int) -> str:
    """``<prefix>/<job_id>/<index:06d>-<seed>.png`` (no leading ``/`` when prefix is empty)."""
    if not job_id or "/" in job_id:
        raise ValueError(f"invalid job_id {job_id!r}: must be non-empty without '/'")
    if index < 0:
        raise ValueError(f"invalid image index {index}: must be >= 0")
    prefix = prefix.strip("/")
    name = f"{job_id}/{index:06d}-{seed}.png"
    return check_key(f"{prefix}/{name}" if prefix else name)


def model_key(sha256: str) -> str:
    """``models/sha256/<sha>.safetensors`` for a lowercase hex sha256."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"invalid sha256 {sha256!r}: must be 64 lowercase hex characters")
    return f"models/sha256/{sha256}.safetensors"


def input_key(sha256: str) -> str:
    """``inputs/<sha>.png``: an input picture (img2img), the sha256 of the PNG's bytes."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"invalid sha256 {sha256!r}: must be 64 lowercase hex characters")
    return f"inputs/{sha256}.png"
