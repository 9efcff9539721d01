"""Textual-inversion embeddings (A1111's) for the CLIP text encoders of SD1 and SDXL.

A file (already converted by the farm) is a safetensors file in one of two layouts:
``emb_params`` (n, width): n vectors for a model with one text encoder (A1111's own
layout; diffusers' ``learned_embeds``, one 1-D or 2-D tensor under any other key, is read
as it), or ``clip_l`` (n, 768) and ``clip_g`` (n, 1280): SDXL's two encoders. The widths
must be the model's. ``EmbeddingStore`` reads the files a batch names (cached by path and
``stat``) into a ``prompts.EmbeddingIndex`` whose names the chunker finds in prompts;
``token_fixes`` puts a chunk's vectors in place of its placeholder ids while an encoder
runs: its token embedding's output is overwritten at those positions, before the position
embeddings are added and the transformer runs (A1111's ``EmbeddingsWithFixes``), so the
end token, and so the pooled output, stay where they were."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from workers.engine.base import EmbeddingError, EmbeddingRequest
from workers.engine.prompts import CHUNK_TOKENS, Embedding, EmbeddingIndex

SD1_KEY = "emb_params"  # A1111's safetensors layout
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL embeddings: CLIP-L's vectors, then bigG's
CACHE_FILES = 256  # files kept per engine (an embedding is a few kB)

Encoder = tuple[str, int]  # what errors call a text encoder, and its width


def read_vectors(
    request: EmbeddingRequest, family: str, encoders: Sequence[Encoder]
) -> list[Tensor]:
    """The embedding's vectors, one float32 (n, width) tensor per text encoder of the
    model (``encoders``: one for SD1, CLIP-L and bigG for SDXL). EmbeddingError naming the
    embedding for a file that cannot be read, lacks its layout's tensors, is made for the
    other family or has vectors of another width or count than the model takes."""
    what = f"embedding {request.name!r}"
    from safetensors.torch import load_file

    try:
        state = load_file(request.path)
    except Exception as exc:  # missing, truncated, not safetensors: all the same to a user
        raise EmbeddingError(f"{what}: cannot read {request.path}: {exc}") from None
    sdxl_file = all(k in state for k in SDXL_KEYS)
    sd1_key = SD1_KEY if SD1_KEY in state else next(iter(state)) if len(state) == 1 else None
    keys = ", ".join(sorted(state)) or "none"
    if len(encoders) == len(SDXL_KEYS):
        if not sdxl_file:
            if sd1_key is not None and sd1_key not in SDXL_KEYS:
                raise EmbeddingError(
                    f"{what}: made for SD1 (one set of vectors, {sd1_key!r}), this {family} "
                    f"model needs {' and '.join(SDXL_KEYS)}"
                )
            raise EmbeddingError(f"{what}: no {' and '.join(SDXL_KEYS)} tensors (has {keys})")
        named = list(zip(SDXL_KEYS, (state[k] for k in SDXL_KEYS), strict=True))
    else:
        if sdxl_file:
            raise EmbeddingError(
                f"{what}: made for SDXL ({', '.join(SDXL_KEYS)}), not for this {family} model"
            )
        if sd1_key is None:
            raise EmbeddingError(
                f"{what}: no {SD1_KEY!r} tensor and not exactly one tensor (has {keys})"
            )
        named = [(sd1_key, state[sd1_key])]
    out = []
    for (key, tensor), (encoder, width) in zip(named, encoders, strict=True):
        if tensor.ndim == 1:
            tensor = tensor[None]
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise EmbeddingError(
                f"{what}: {key!r} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, "
                f"not (vectors, {width}) floats"
            )
        if tensor.shape[1] != width:
            raise EmbeddingError(
                f"{what}: {key!r} has vectors {tensor.shape[1]} wide, this {family} model's "
                f"{encoder} takes {width}"
            )
        if not 1 <= tensor.shape[0] <= CHUNK_TOKENS:
            raise EmbeddingError(
                f"{what}: {key!r} has {tensor.shape[0]} vectors; a prompt chunk takes 1 to "
                f"{CHUNK_TOKENS}"
            )
        out.append(tensor.float())
    if len({t.shape[0] for t in out}) > 1:
        counts = ", ".join(f"{k} {t.shape[0]}" for (k, _), t in zip(named, out, strict=True))
        raise EmbeddingError(f"{what}: its encoders' vector counts differ ({counts})")
    return out


class EmbeddingStore:
    """One engine's embeddings: files read once and kept by path (again when a file's
    ``stat`` changes), names tokenized with the engine's tokenizer."""

    def __init__(
        self, family: str, encoders: Sequence[Encoder], tokenize: Callable[[str], list[int]]
    ) -> None:
        self.family = family
        self.encoders = tuple(encoders)
        self.tokenize = tokenize
        self.files: OrderedDict[str, tuple[tuple[int, int], list[Tensor]]] = OrderedDict()

    def vectors(self, request: EmbeddingRequest) -> list[Tensor]:
        try:
            st = os.stat(request.path)
        except OSError as exc:
            raise EmbeddingError(
                f"embedding {request.name!r}: cannot read {request.path}: {exc}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.files.get(request.path)
        if cached is not None and cached[0] == stamp:
            self.files.move_to_end(request.path)
            return cached[1]
        got = read_vectors(request, self.family, self.encoders)
        self.files[request.path] = (stamp, got)
        while len(self.files) > CACHE_FILES:
            self.files.popitem(last=False)
        return got

    def index(self, requests: Sequence[EmbeddingRequest]) -> EmbeddingIndex | None:
        """The batch's embeddings as the chunker finds them (None when there are none, so a
        batch without embeddings chunks exactly as before). EmbeddingError naming an
        embedding whose file cannot be used, whose name gives no tokens, or a name given
        twice with different files."""
        if not requests:
            return None
        found: dict[str, Embedding] = {}
        paths: dict[str, str] = {}
        for request in requests:
            if request.name in paths:
                if paths[request.name] != request.path:
                    raise EmbeddingError(
                        f"embedding {request.name!r}: named twice, with different files"
                    )
                continue
            ids = tuple(self.tokenize(request.name))
            if not ids:
                raise EmbeddingError(
                    f"embedding {request.name!r}: the name gives no tokens to find in a prompt"
                )
            vectors = self.vectors(request)
            paths[request.name] = request.path
            found[request.name] = Embedding(request.name, ids, vectors[0].shape[0], vectors)
        return EmbeddingIndex(found.values())


@contextmanager
def token_fixes(encoder: Any, rows: Sequence[Sequence[int]], which: int) -> Iterator[None]:
    """While it lasts, ``encoder`` (a transformers CLIP text model) reading a batch of
    ``rows`` (the chunks' ids, as the tensor it is given) sees each chunk's embedding
    vectors (``fixes``, each embedding's ``vectors[which]``) in place of the token
    embeddings at their positions; position embeddings and everything after are the
    model's. Nothing to do for rows without fixes."""
    fixes = [
        (row, at, emb.vectors[which])
        for row, chunk in enumerate(rows)
        for at, emb in getattr(chunk, "fixes", ())
    ]
    if not fixes:
        yield
        return

    def hook(_module: Any, _args: Any, output: Tensor) -> Tensor:
        if output.shape[0] != len(rows):
            raise RuntimeError(f"token embedding of {output.shape[0]} rows, not {len(rows)}")
        output = output.clone()
        for row, at, vectors in fixes:
            output[row, at : at + vectors.shape[0]] = vectors.to(output)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
