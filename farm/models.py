"""Model registry: names -> checkpoints stored by sha256, kept in Redis.

The blobs live in object storage (``storage.models``); this module only maps names to
them. The model ``synthetic`` is built in: it needs no checkpoint and renders a solid
image at once, for load-testing a farm's plumbing. A LoRA is registered the same way,
with the engine ``lora``: it renders nothing on its own, a job lists it in ``loras``. A
textual-inversion embedding is registered with the engine ``embedding``: a prompt uses it
by its name (``farm.embeddings``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import redis

SYNTHETIC = "synthetic"
LORA = "lora"  # the engine of a LoRA file: merged into a checkpoint's weights by a job
LORA_ENGINES = ("sd1", "sdxl")  # the engines of the checkpoints a LoRA can be merged into
EMBEDDING = "embedding"  # the engine of a textual-inversion embedding: prompts name it
ADDONS = (LORA, EMBEDDING)  # entries that are no checkpoint: a job cannot name them as model
EMBEDDING_MAX_VECTORS = 75  # the prompt tokens of one chunk, which an embedding must fit in
# key endings of the LoRA layouts the engine reads (workers.engine.lora), and of LyCORIS
# kinds it does not
_LORA_KEYS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")
_LYCORIS_KEYS = (".hada_w1_a", ".lokr_w1", ".lokr_w1_a", ".oft_blocks", ".oft_diag")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    # "sd1", "sdxl", "flux" (a checkpoint the diffusion engine loads), "synthetic", or an
    # add-on: "lora", "embedding"
    engine: str
    sha256: str = ""
    size: int = 0
    key: str = ""
    added_at: float = 0.0
    # a LoRA's or an embedding's: the family of the models it was made for, when its file
    # tells (lora_family; an embedding's always does)
    family: str = ""
    # an embedding's: its vectors (the prompt positions it takes), and the sha256 of the
    # file as it was added (before its conversion to safetensors: A1111's "TI hashes")
    vectors: int = 0
    source_sha256: str = ""

    @property
    def is_checkpoint(self) -> bool:
        """A model a job can name (not a LoRA or an embedding)."""
        return self.engine not in ADDONS

    @property
    def kind(self) -> str:
        """What it is, in words: "a LoRA", "an embedding", "a checkpoint (sd1)"."""
        if self.engine == LORA:
            return "a LoRA"
        if self.engine == EMBEDDING:
            return "a textual-inversion embedding"
        return f"a checkpoint ({self.engine})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelEntry:
        """An entry as stored; fields a newer version added are dropped, so a registry
        written by it still reads during a rolling upgrade."""
        return cls(**{k: v for k, v in raw.items() if k in _ENTRY_FIELDS})


_ENTRY_FIELDS = frozenset(f.name for f in fields(ModelEntry))
SYNTHETIC_ENTRY = ModelEntry(name=SYNTHETIC, engine="synthetic")


def no_loras(entry: ModelEntry) -> str:
    """Why a job on ``entry`` cannot have LoRAs."""
    return (
        f"model {entry.name!r} ({entry.engine}) takes no LoRA; LoRAs go with "
        f"{' or '.join(f'{e} models' for e in LORA_ENGINES)}"
    )


class ModelRegistry:
    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.key = f"{namespace}:models"

    def add(self, entry: ModelEntry) -> ModelEntry:
        if entry.name == SYNTHETIC:
            raise ValueError(f"the name {SYNTHETIC!r} is reserved for the built-in model")
        if not entry.added_at:
            entry = ModelEntry(**{**entry.to_dict(), "added_at": time.time()})
        self.r.hset(self.key, entry.name, json.dumps(entry.to_dict()))
        return entry

    def get(self, name: str) -> ModelEntry | None:
        if name == SYNTHETIC:
            return SYNTHETIC_ENTRY
        raw = self.r.hget(self.key, name)
        return ModelEntry.from_dict(json.loads(raw)) if raw else None

    def list(self) -> list[ModelEntry]:
        """Every entry, LoRAs too, by name (``synthetic`` first)."""
        entries = [ModelEntry.from_dict(json.loads(v)) for v in self.r.hvals(self.key)]
        return [SYNTHETIC_ENTRY, *sorted(entries, key=lambda e: e.name)]

    def checkpoints(self) -> list[ModelEntry]:
        """The entries a job can name as its ``model``: all but the LoRAs and embeddings."""
        return [e for e in self.list() if e.is_checkpoint]

    def loras(self) -> list[ModelEntry]:
        return [e for e in self.list() if e.engine == LORA]

    def embeddings(self) -> list[ModelEntry]:
        return [e for e in self.list() if e.engine == EMBEDDING]

    def remove(self, name: str) -> bool:
        return bool(self.r.hdel(self.key, name))


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, read without torch."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            return json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a safetensors file ({exc})") from None


def probe_engine(path: str | Path) -> str:
    """Which engine family a checkpoint needs, or ``lora`` for a LoRA file, from its
    tensor names (no torch)."""
    header = read_safetensors_header(path)
    if any(name.endswith(_LORA_KEYS) for name in header):
        return LORA
    if any(name.endswith(_LYCORIS_KEYS) for name in header):
        raise ValueError(
            f"{path}: a LyCORIS file (LoHa, LoKr, OFT, ...); the farm reads LoRA files only "
            "(kohya lora_down/lora_up or peft lora_A/lora_B keys)"
        )
    k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    # BFL's transformer-only file, or the all-in-one checkpoint (Forge, ComfyUI), whose
    # model.diffusion_model. prefix would otherwise read as SD1's
    if any(
        name.startswith(("double_blocks.", "model.diffusion_model.double_blocks."))
        for name in header
    ):
        return "flux"
    if any(name.startswith("conditioner.embedders.1") for name in header):
        return "sdxl"
    if k in header:
        width = header[k]["shape"][1]
        return {1024: "sd2", 1280: "sdxl-refiner", 2048: "sdxl"}.get(width, "sd1")
    if any(name.startswith("model.diffusion_model.") for name in header):
        return "sd1"
    raise ValueError(f"{path}: no known diffusion model layout in its tensor names")


# a LoRA's family from the width of the text context its cross-attention keys and values
# read, or failing that from its text encoders' prefixes and widths
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 1280: "sdxl-refiner", 2048: "sdxl"}
_CONTEXT_DOWN = ("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight",
                 "attn2.to_k.lora_A.weight", "attn2.to_v.lora_A.weight")  # fmt: skip
_SDXL_ENCODERS = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_ENCODER_QUERY = ("self_attn_q_proj.lora_down.weight", "self_attn.q_proj.lora_A.weight")
_ENCODER_WIDTHS = {768: "sd1", 1024: "sd2"}


# what a Flux model renders with (workers.engine.flux): the one sampler that fits a flow
# model, its own schedule, sizes in whole 2x2 patches of latents
FLUX_LIMITS = {"sampler_name": ("Euler",), "scheduler": ("Automatic", "Uniform")}
FLUX_SIZE_MULTIPLE = 16
# a Flux job's settings where it leaves them out (the spec's own defaults are SD's): its
# one sampler, and the distilled guidance Forge starts at
FLUX_DEFAULTS: dict[str, Any] = {"sampler_name": "Euler", "cfg_scale": 3.5}


def family_problems(engine: str, settings: dict[str, Any]) -> list[tuple[str, str]]:
    """(setting, why) for each of a job's ``settings`` (sampler_name, scheduler, width,
    height, clip_skip) that a model of family ``engine`` cannot render."""
    out = []
    if settings.get("clip_skip", 1) != 1 and engine != "sd1":
        why = (f"{settings['clip_skip']} is for SD1 models; a {engine} model reads its own "
               "layers of its text encoders (A1111 skips none on SDXL either)")  # fmt: skip
        out.append(("clip_skip", why))
    if engine != "flux":
        return out
    for key, allowed in FLUX_LIMITS.items():
        if key in settings and settings[key] not in allowed:
            out.append((key, f"{settings[key]!r} does not render a Flux model; allowed for "
                             f"Flux: {', '.join(allowed)}"))  # fmt: skip
    for key in ("width", "height"):
        if key in settings and settings[key] % FLUX_SIZE_MULTIPLE:
            out.append((key, f"{settings[key]} is not a multiple of {FLUX_SIZE_MULTIPLE}, "
                             "which a Flux model needs"))  # fmt: skip
    return out


# the parts of an all-in-one Flux checkpoint (Forge's and ComfyUI's layout), by key prefix
FLUX_PARTS = {
    "the transformer": "model.diffusion_model.double_blocks.",
    "text encoder CLIP-L": "text_encoders.clip_l.",
    "text encoder T5-XXL": "text_encoders.t5xxl.",
    "the VAE": "vae.",
}


# what a UNet whose first convolution reads other than 4 or 9 channels was trained for
_UNET_INPUTS = {
    8: "an InstructPix2Pix checkpoint (its UNet reads 8 channels: the latents and the picture)",
}


def unet_input_problem(path: str | Path) -> str | None:
    """Why an SD1 or SDXL checkpoint cannot render as the engine does (a UNet that reads
    other than the 4 latent channels, or 9 as an inpainting checkpoint's: the latents, the
    mask and the masked picture's latents), or None."""
    info = read_safetensors_header(path).get("model.diffusion_model.input_blocks.0.0.weight")
    if not isinstance(info, dict) or len(info.get("shape", ())) != 4:
        return None
    channels = int(info["shape"][1])
    if channels in (4, 9):
        return None
    what = _UNET_INPUTS.get(channels, f"a checkpoint whose UNet reads {channels} channels")
    return (
        f"{what}; the farm renders models whose UNet reads the 4 latent channels, or 9 "
        "(inpainting checkpoints)"
    )


def flux_missing_parts(path: str | Path) -> list[str]:
    """The parts of an all-in-one Flux checkpoint that the file lacks, each with its key
    prefix (BFL's transformer-only file lacks all but the transformer)."""
    names = read_safetensors_header(path).keys()
    return [
        f"{part} ({prefix}*)"
        for part, prefix in FLUX_PARTS.items()
        if not any(n.startswith(prefix) for n in names)
    ]


def lora_family(path: str | Path) -> str | None:
    """The model family a LoRA file was made for (``sd1``, ``sd2``, ``sdxl``, ...) from its
    tensor names and shapes (no torch), or None when they do not say."""
    header = read_safetensors_header(path)
    for name, info in header.items():
        if name.endswith(_CONTEXT_DOWN) and isinstance(info, dict) and len(info["shape"]) == 2:
            if family := _CONTEXT_WIDTHS.get(int(info["shape"][1])):
                return family
    if any(name.startswith(_SDXL_ENCODERS) for name in header):
        return "sdxl"
    for name, info in header.items():
        if name.startswith(("lora_te_", "text_encoder.")) and name.endswith(_ENCODER_QUERY):
            if family := _ENCODER_WIDTHS.get(int(info["shape"][1])):
                return family
    return None


def lora_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA file (what its ``Lora hashes`` infotext shows the first 12
    hex digits of): the ``sshs_model_hash`` of its metadata if it has one, else the sha256
    of the file after its header (the "addnet" hash, which also finds it on civitai)."""
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    given = metadata.get("sshs_model_hash") if isinstance(metadata, dict) else None
    if isinstance(given, str) and given:
        return given
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        return hashlib.file_digest(fh, "sha256").hexdigest()
