"""LoRA for any engine: read a LoRA file and merge it into the weights of torch modules,
reversibly. Nothing here knows a model family: an engine names its layers the way LoRA
files do (``module_index``) and keeps a ``MergedLoras`` over them.

File layouts read:

- kohya / A1111: ``lora_unet_<path>.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha``, ``lora_te_<path>...`` for the text encoder (SDXL's: ``lora_te1_``,
  ``lora_te2_``), where ``<path>`` is the module's dotted name with ``_`` for ``.``
  (``lora_unet_down_blocks_1_attentions_0_proj_in``);
- diffusers / peft: ``unet.<path>.lora_A.weight`` (down) and ``.lora_B.weight`` (up),
  ``text_encoder.<path>...``, ``text_encoder_2.<path>...``, read as the kohya names they
  stand for, which the engine says (``MergedLoras(roots=...)``: ``text_encoder.`` is
  SD1's ``lora_te_``, SDXL's ``lora_te1_``).

A layer is an ``nn.Linear`` or an ``nn.Conv2d`` of any kernel (the down factor carries
the kernel, the up factor is 1x1). Its delta is ``weight * alpha / rank * up @ down``
(no alpha: alpha = rank). LyCORIS kinds (LoHa, LoKr, a LoCon's ``lora_mid``, DoRA's
``dora_scale``) are not read: their layers count as not applied.

A file made for another model family is refused as a whole, though some of its layers may
match by name and shape (an SD1 LoRA's ``down_blocks_1`` attention layers have the shapes
of SDXL's): a layer under a kohya prefix the model has no layer under (``lora_te_`` on
SDXL, ``lora_te1_`` on SD1), or a cross-attention key or value projection
(``attn2_to_k``, ``attn2_to_v``) named like the model's but reading a text context of
another width (768 SD1, 1024 SD2, 2048 SDXL).

Merging writes ``W + delta`` into the weights in place, so sampling costs nothing more
than without a LoRA. The original tensors of the layers touched are kept on the CPU and
copied back to remove the LoRAs: bit for bit what was there (subtracting the delta again
would drift, in fp16 more so), and no GPU memory is spent on them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from workers.engine.base import LoraError, LoraRequest, Progress

log = logging.getLogger("farm.engine")

# key suffix -> the part of a layer it holds
_PARTS = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
# diffusers / peft roots -> kohya prefixes (SD1's; SDXL's first encoder is lora_te1_)
ROOTS = {"unet.": "lora_unet_", "text_encoder.": "lora_te_", "text_encoder_2.": "lora_te2_"}
# the layers that read the text context: their input width is the model family's
_CONTEXT_LAYERS = ("attn2_to_k", "attn2_to_v")
_TICK_EVERY = 16  # layers merged between two progress calls


@dataclass(frozen=True)
class LoraLayer:
    down: Tensor  # (rank, in, *kernel) or (rank, in)
    up: Tensor  # (out, rank, 1, 1) or (out, rank)
    alpha: float | None
    keys: int  # how many keys of the file it is made of

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, weight: float) -> float:
        alpha = self.alpha if self.alpha else self.rank  # kohya: alpha 0 or none = rank
        return weight * alpha / self.rank

    def fits(self, target: Tensor) -> bool:
        """Whether ``up @ down`` has the shape of ``target`` (a Linear's or Conv2d's
        weight; 1x1 convolutions and linear factors stand for each other)."""
        out = int(target.shape[0])
        per_out = target.numel() // max(1, out)
        return (
            self.up.ndim >= 2
            and int(self.up.shape[0]) == out
            and self.up.numel() == out * self.rank
            and self.down.numel() == self.rank * per_out
        )

    def delta(self, target: Tensor) -> Tensor:
        """``up @ down`` in float32 on ``target``'s device, shaped (out, rest of target)."""
        up = self.up.to(target.device, torch.float32).reshape(target.shape[0], self.rank)
        down = self.down.to(target.device, torch.float32).reshape(self.rank, -1)
        return up @ down


def layer_name(key: str, roots: Mapping[str, str] = ROOTS) -> tuple[str, str] | None:
    """(kohya layer name, part) of a LoRA file key, or None for a key of another kind.
    ``roots``: the kohya prefix each diffusers / peft root stands for."""
    suffix = next((x for x in _PARTS if key.endswith(x)), None)
    if suffix is None:
        return None
    base, part = key[: -len(suffix)], _PARTS[suffix]
    if base.startswith("lora_"):
        return base, part
    for root, prefix in roots.items():
        if base.startswith(root):
            return prefix + base[len(root) :].replace(".", "_"), part
    return None


def read_lora(
    path: str | Path, name: str = "", roots: Mapping[str, str] = ROOTS
) -> tuple[dict[str, LoraLayer], list[str]]:
    """The layers of a LoRA file by kohya name (peft keys named by ``roots``), and the keys
    that make no layer (another kind, a layer with a part missing or one not read here).
    LoraError naming the LoRA if the file cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"LoRA {name!r} ({Path(path).name})" if name else f"LoRA {Path(path).name}"
    try:
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError, ValueError) as exc:
        raise LoraError(f"{what} is not a readable .safetensors file: {exc}") from None
    parts: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, list[str]] = {}
    other: list[str] = []
    for key, value in tensors.items():
        found = layer_name(key, roots)
        if found is None:
            other.append(key)
            continue
        base, part = found
        parts.setdefault(base, {})[part] = value
        keys.setdefault(base, []).append(key)
    # a layer with parts this module does not read (lora_mid, dora_scale) would be wrong
    # if merged without them
    dotted = {k.rsplit(".", n)[0] for k in other for n in (1, 2) if k.count(".") >= n}
    layers: dict[str, LoraLayer] = {}
    for base, got in parts.items():
        down, up = got.get("down"), got.get("up")
        if down is None or up is None or base in dotted or down.ndim < 2 or not down.shape[0]:
            other.extend(keys[base])
            continue
        alpha = float(got["alpha"].float().reshape(-1)[0]) if "alpha" in got else None
        if alpha is not None and not math.isfinite(alpha):
            raise LoraError(f"{what}: layer {base} has alpha {alpha}")
        layers[base] = LoraLayer(down, up, alpha, len(keys[base]))
    return layers, other


def module_index(
    prefix: str, root: nn.Module, names: Callable[[str], Iterable[str]] | None = None
) -> dict[str, nn.Module]:
    """``<prefix>_<name with _ for .>`` -> each Linear and Conv2d layer of ``root``: the
    names LoRA files give them. ``names`` maps a module's dotted name to every name LoRA
    files may use for it (another layout's, say); by default its own."""
    out: dict[str, nn.Module] = {}
    for dotted, module in root.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            for n in names(dotted) if names else (dotted,):
                out[f"{prefix}_{n.replace('.', '_')}"] = module
    return out


def kohya_prefix(name: str) -> str:
    """The component part of a kohya layer name: ``lora_unet``, ``lora_te``, ``lora_te1``."""
    return "_".join(name.split("_", 2)[:2])


def _identity(lora: LoraRequest) -> tuple[str, int, int, float]:
    """What makes two requests the same merge: the file (path, size, mtime) and weight."""
    try:
        st = os.stat(lora.path)
    except OSError as exc:
        raise LoraError(f"LoRA {lora.name!r}: cannot read {lora.path}: {exc}") from None
    return os.path.abspath(lora.path), st.st_size, st.st_mtime_ns, float(lora.weight)


class MergedLoras:
    """The LoRAs merged into a set of modules now, with the original weights of the layers
    they touched (on the CPU), so that another set replaces them exactly."""

    def __init__(
        self, index: Callable[[], Mapping[str, nn.Module]], roots: Mapping[str, str] = ROOTS
    ) -> None:
        """``index``: the layers by the names LoRA files use (``module_index``), built once
        at the first merge. ``roots``: the kohya prefix of each diffusers / peft root."""
        self._index_of = index
        self._index: Mapping[str, nn.Module] | None = None
        self._prefixes: frozenset[str] = frozenset()
        self.roots = dict(roots)
        self._saved: dict[nn.Module, Tensor] = {}
        self.applied: tuple[tuple[str, int, int, float], ...] = ()

    @property
    def index(self) -> Mapping[str, nn.Module]:
        if self._index is None:
            self._index = self._index_of()
            self._prefixes = frozenset(kohya_prefix(name) for name in self._index)
        return self._index

    def apply(self, loras: Sequence[LoraRequest], progress: Progress | None = None) -> bool:
        """Make exactly ``loras`` (in order) the merged set. The same set as now costs a
        stat per file; another restores the originals, then merges. A file that cannot be
        read or matches no layer raises LoraError before any weight changes. True if the
        weights changed."""
        wanted = tuple(_identity(lora) for lora in loras)
        if wanted == self.applied:
            return False
        plan = self._plan(loras, progress)
        changed = bool(self._saved)
        self.restore()
        try:
            self._merge(plan, progress)
        except BaseException:
            self.restore()
            raise
        self.applied = wanted
        return changed or bool(plan)

    def restore(self) -> None:
        """Put back the original weights of every layer a merge touched."""
        with torch.no_grad():
            for module, original in self._saved.items():
                module.weight.copy_(original)
        self._saved.clear()
        self.applied = ()

    def _plan(
        self, loras: Sequence[LoraRequest], progress: Progress | None
    ) -> dict[nn.Module, list[tuple[LoraLayer, float]]]:
        """module -> its (layer, scale) of every LoRA; checks each file fits the model."""
        plan: dict[nn.Module, list[tuple[LoraLayer, float]]] = {}
        index = self.index
        for lora in loras:
            what = f"LoRA {lora.name!r} ({Path(lora.path).name})"
            layers, other = read_lora(lora.path, lora.name, self.roots)
            if progress is not None:
                progress()
            matched: list[tuple[nn.Module, LoraLayer]] = []
            missing, misfit = [], []
            for base, layer in layers.items():
                module = index.get(base)
                if module is None:
                    missing.append(base)
                elif not layer.fits(module.weight):
                    misfit.append(base)
                else:
                    matched.append((module, layer))
            if not matched:
                if not layers:
                    shown = ", ".join(other[:3]) or "none"
                    raise LoraError(
                        f"{what} holds no LoRA layer this engine reads (kohya lora_down/"
                        f"lora_up or peft lora_A/lora_B); its keys: {shown}"
                    )
                raise LoraError(
                    f"{what} matches no layer of this model: {len(missing)} of its "
                    f"{len(layers)} layers name none (like {', '.join(missing[:2]) or '-'}), "
                    f"{len(misfit)} have another shape (like {', '.join(misfit[:2]) or '-'}); "
                    "is it a LoRA for another model family?"
                )
            foreign = self._foreign(layers, misfit)
            if foreign:
                raise LoraError(f"{what} is a LoRA for another model family: {foreign}")
            unmatched = len(other) + sum(layers[b].keys for b in missing + misfit)
            if unmatched:
                log.warning(
                    "%s: %d of its %d layers applied; %d keys not applied (%d layers name "
                    "none of the model's, %d of another shape; e.g. %s)",
                    what, len(matched), len(layers), unmatched, len(missing), len(misfit),
                    ", ".join((missing + misfit + other)[:3]),
                )  # fmt: skip
            if lora.weight == 0:
                continue  # checked, and nothing to add
            for module, layer in matched:
                plan.setdefault(module, []).append((layer, layer.scale(lora.weight)))
        return plan

    def _foreign(self, layers: Mapping[str, LoraLayer], misfit: Sequence[str]) -> str:
        """Why a file that matches some layers is for another family, or "" if it is not."""
        parts = sorted({kohya_prefix(b) for b in layers} - self._prefixes)
        if parts:
            return (
                f"it has layers of {', '.join(p + '_' for p in parts)}, which this model "
                f"has none of (it has {', '.join(p + '_' for p in sorted(self._prefixes))})"
            )
        context = [b for b in misfit if b.endswith(_CONTEXT_LAYERS)]
        if context:
            theirs = int(layers[context[0]].down.shape[1])
            ours = int(self.index[context[0]].weight.shape[1])
            return (
                f"its cross-attention layers (like {context[0]}) read a text context "
                f"{theirs} wide, this model's {ours}"
            )
        return ""

    @torch.no_grad()
    def _merge(
        self, plan: Mapping[nn.Module, list[tuple[LoraLayer, float]]], progress: Progress | None
    ) -> None:
        """One layer at a time, so the extra memory is one layer's delta."""
        for i, (module, parts) in enumerate(plan.items()):
            weight = module.weight
            self._saved[module] = weight.detach().to("cpu", copy=True)
            delta = torch.zeros(
                weight.shape[0], weight[0].numel(), dtype=torch.float32, device=weight.device
            )
            for layer, scale in parts:
                delta.add_(layer.delta(weight), alpha=scale)
            weight.copy_((weight.float() + delta.reshape(weight.shape)).to(weight.dtype))
            if progress is not None and i % _TICK_EVERY == _TICK_EVERY - 1:
                progress()
