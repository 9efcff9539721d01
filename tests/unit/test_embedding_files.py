"""farm.embedding_files: embeddings read without torch, checked against torch itself."""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load, save_file  # noqa: E402

from farm.embedding_files import (  # noqa: E402
    EmbeddingFile,
    EmbeddingFileError,
    is_embedding,
    read_embedding,
    to_safetensors,
)
from farm.models import probe_engine  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape: int, dtype: Any = torch.float32, seed: int = 0) -> Any:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def a1111(vec: Any) -> dict[str, Any]:
    """What A1111's textual inversion saves."""
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "my-style",
        "step": 1500,
        "sd_checkpoint": "a9263745",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
        "extra": [torch.tensor([1, 2, 3]), torch.tensor(265), "text", 1.5, None, (1, 2)],
    }


def write_pt(path: Path, obj: Any, **kw: Any) -> Path:
    torch.save(obj, path, **kw)
    return path


def write_st(path: Path, tensors: dict[str, Any]) -> Path:
    save_file(tensors, str(path))
    return path


def round_trip(path: Path, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    emb = read_embedding(path)
    out = load(to_safetensors(emb, metadata))
    assert set(out) == set(emb.tensors)
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    for name, (dtype, shape, _) in emb.tensors.items():
        assert tuple(out[name].shape) == shape and names[out[name].dtype] == dtype
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a1111_pt_reads_exactly_what_torch_loads(tmp_path: Path, dtype: Any) -> None:
    path = write_pt(tmp_path / "style.pt", a1111(randn(3, 768, dtype=dtype)))
    want = torch.load(path, weights_only=True)["string_to_param"]["*"]
    emb = read_embedding(path)
    assert (emb.family, emb.vectors) == ("sd1", 3)
    got = round_trip(path)["emb_params"]
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_view_with_a_storage_offset_reads_only_its_rows(tmp_path: Path, dtype: Any) -> None:
    big = randn(8, 768, dtype=dtype, seed=1)
    view = big[2:5]
    path = write_pt(tmp_path / "view.pt", a1111(view))
    loaded = torch.load(path, weights_only=True)["string_to_param"]["*"]
    assert loaded.storage_offset() == 2 * 768  # torch.save kept the whole storage
    assert loaded.untyped_storage().nbytes() == big.numel() * big.element_size()
    got = round_trip(path)["emb_params"]
    assert got.shape == (3, 768) and torch.equal(got, loaded) and torch.equal(got, view)


def test_strided_views_are_gathered(tmp_path: Path) -> None:
    transposed = randn(768, 4, seed=2).T  # strides (1, 4)
    every_other = randn(6, 1536, seed=3)[1::2, ::2]  # offset, row and element strides
    for i, view in enumerate([transposed, every_other]):
        assert not view.is_contiguous()
        path = write_pt(tmp_path / f"v{i}.bin", {"<tok>": view})
        got = round_trip(path)["emb_params"]
        assert torch.equal(got, torch.load(path, weights_only=True)["<tok>"])
        assert torch.equal(got, view)


@pytest.mark.parametrize("shape", [(768,), (2, 768)])
def test_diffusers_learned_embeds_bin(tmp_path: Path, shape: tuple[int, ...]) -> None:
    vec = randn(*shape, dtype=torch.float16, seed=4)
    path = write_pt(tmp_path / "learned_embeds.bin", {"<cat-toy>": vec})
    emb = read_embedding(path)
    assert emb.vectors == (1 if len(shape) == 1 else shape[0])
    got = round_trip(path)["emb_params"]
    assert torch.equal(got, vec.reshape(-1, 768))


def test_a_parameter_dict_and_parameters_read(tmp_path: Path) -> None:
    """The original textual-inversion code saved an nn.ParameterDict of nn.Parameters."""
    vec = randn(2, 768, seed=5)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    path = write_pt(tmp_path / "ti.pt", {"string_to_param": params, "string_to_token": {}})
    assert torch.equal(round_trip(path)["emb_params"], vec)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_safetensors_layouts(tmp_path: Path, dtype: Any) -> None:
    vec = randn(4, 768, dtype=dtype, seed=6)
    for name, tensors in {
        "a1111.safetensors": {"emb_params": vec},
        "learned_embeds.safetensors": {"<tok>": vec},
        "one.safetensors": {"<tok>": vec[0].clone()},
    }.items():
        path = write_st(tmp_path / name, tensors)
        got = round_trip(path)["emb_params"]
        assert got.dtype == dtype
        assert torch.equal(got, next(iter(tensors.values())).reshape(-1, 768))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_from_safetensors_and_pt(tmp_path: Path, dtype: Any) -> None:
    tensors = {"clip_l": randn(3, 768, dtype=dtype, seed=7), "clip_g": randn(3, 1280, seed=8)}
    for path in [
        write_st(tmp_path / "xl.safetensors", tensors),
        write_pt(tmp_path / "xl.pt", tensors),
    ]:
        emb = read_embedding(path)
        assert (emb.family, emb.vectors) == ("sdxl", 3)
        got = round_trip(path)
        assert set(got) == {"clip_l", "clip_g"}
        for name, want in tensors.items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want)


def test_content_not_name_decides(tmp_path: Path) -> None:
    vec = randn(2, 768, seed=9)
    zip_named_st = write_pt(tmp_path / "really_a_pt.safetensors", a1111(vec))
    st_named_pt = write_st(tmp_path / "really_st.pt", {"emb_params": vec})
    for path in (zip_named_st, st_named_pt):
        assert torch.equal(round_trip(path)["emb_params"], vec)


def test_to_safetensors_writes_metadata_and_a_loadable_file(tmp_path: Path) -> None:
    path = write_pt(tmp_path / "style.pt", a1111(randn(2, 768, seed=10)))
    out = tmp_path / "out.safetensors"
    out.write_bytes(to_safetensors(read_embedding(path), {"name": "my-style", "farm.v": "1"}))
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"name": "my-style", "farm.v": "1"}
        assert torch.equal(f.get_tensor("emb_params"), torch.load(path)["string_to_param"]["*"])
    assert (len(out.read_bytes()) - 8) % 8 == 0  # header padded to 8 bytes, data 4-aligned
    # the converted file is itself an embedding file, read back to the same thing
    assert read_embedding(out) == read_embedding(path)
    bad = EmbeddingFile("sd1", 1, {"emb_params": ("F32", (1, 768), b"\0" * 10)})
    with pytest.raises(ValueError, match="10 bytes"):
        to_safetensors(bad)


# --- a pickle that would run code -------------------------------------------------------


def torch_like_zip(path: Path, pickled: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as torch.save lays it out, holding the given pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for name, data in (records or {}).items():
            zf.writestr(f"archive/{name}", data)
    return path


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_asking_for_os_system_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    live = tmp_path / "live"
    pickle.loads(pickle.dumps({"x": Evil(live)}))  # the payload is live: plain pickle runs it
    assert live.exists()

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"string_to_param": {"*": Evil(marker)}}, protocol=2)
    zipped = torch_like_zip(tmp_path / "evil.pt", payload)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(payload)
    for path in (zipped, raw):
        with pytest.raises(EmbeddingFileError, match=r"not an embedding file .*system"):
            read_embedding(path)
        assert not is_embedding(path)
    assert not marker.exists()


# --- refusals -----------------------------------------------------------------------------


class FakeStorage:
    """Pickled by ``persistent_id`` as torch pickles a storage, with any numel we like."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class FakeTensor:
    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, tuple]:
        return torch._utils._rebuild_tensor_v2, self.args


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def crafted(path: Path, storage: FakeStorage, tensor: FakeTensor, data: bytes) -> Path:
    buf = io.BytesIO()
    StoragePickler(buf, protocol=2).dump({"string_to_param": {"*": tensor}})
    return torch_like_zip(path, buf.getvalue(), {"data/0": data})


def test_crafted_archive_helper_reads_like_torch(tmp_path: Path) -> None:
    """The crafting helper itself writes what torch reads, so the refusals below are real."""
    vec = randn(2, 768, seed=11)
    storage = FakeStorage(2 * 768)
    path = crafted(tmp_path / "ok.pt", storage, FakeTensor(storage, 0, (2, 768), (768, 1)),
                   vec.numpy().tobytes())  # fmt: skip
    assert torch.equal(torch.load(path, weights_only=True)["string_to_param"]["*"], vec)
    assert torch.equal(round_trip(path)["emb_params"], vec)


def refusal(path: Path) -> str:
    with pytest.raises(EmbeddingFileError) as info:
        read_embedding(path)
    return str(info.value)


def test_refusals_say_what_is_wrong(tmp_path: Path) -> None:
    v = randn(2, 768, seed=12)
    cases: dict[str, tuple[Path, str]] = {
        "sd2": (
            write_pt(tmp_path / "sd2.pt", a1111(randn(2, 1024))),
            r"SD2\.x.*does not render SD2",
        ),
        "sd2 st": (write_st(tmp_path / "sd2.st", {"emb_params": randn(1024)}), r"SD2\.x"),
        "width": (write_st(tmp_path / "w.st", {"<t>": randn(2, 512)}), r"512 wide.*SD1 .*768"),
        "g alone": (write_st(tmp_path / "g.st", {"emb_params": randn(1, 1280)}), r"clip_g half"),
        "several": (
            write_pt(tmp_path / "two.pt", {"string_to_param": {"*": v, "+": v}}),
            r"string_to_param holds 2 vector sets \('\*', '\+'\).*exactly one",
        ),
        "none": (write_pt(tmp_path / "0.pt", {"string_to_param": {}}), r"holds 0 vector sets"),
        "legacy": (
            write_pt(tmp_path / "old.pt", a1111(v), _use_new_zipfile_serialization=False),
            r"legacy .*re-save it with a recent torch .*convert it to safetensors",
        ),
        "empty": (
            write_pt(tmp_path / "e.pt", a1111(torch.zeros(0, 768))),
            r"empty \(shape \[0, 768\]\)",
        ),
        "empty st": (write_st(tmp_path / "e.st", {"emb_params": torch.zeros(0, 768)}), r"empty"),
        "3d": (
            write_st(tmp_path / "3d.st", {"emb_params": randn(1, 2, 768)}),
            r"\(vectors, width\)",
        ),
        "ints": (
            write_pt(tmp_path / "i.pt", {"emb_params": torch.ones(2, 768, dtype=torch.long)}),
            r"dtype I64",
        ),
        "xl counts": (
            write_st(tmp_path / "xl.st", {"clip_l": randn(2, 768), "clip_g": randn(3, 1280)}),
            r"2 clip_l vectors but 3 clip_g vectors",
        ),
        "xl half": (write_st(tmp_path / "xlh.st", {"clip_l": randn(2, 768)}), r"without a clip_g"),
        "xl widths": (
            write_st(tmp_path / "xlw.st", {"clip_l": randn(2, 1280), "clip_g": randn(2, 768)}),
            r"clip_l 1280 and clip_g 768 wide",
        ),
        "checkpoint": (
            write_pt(tmp_path / "m.ckpt", {"state_dict": {"a.weight": v}, "global_step": 3}),
            r"not an embedding file",
        ),
        "other pickle": (
            write_pt(tmp_path / "o.pt", {"string_to_param": {"*": torch.nn.Linear(2, 2)}}),
            r"not an embedding file \(its pickle asks for torch\.nn\.modules\.linear\.Linear",
        ),
        "random": (tmp_path / "r.bin", r"neither a torch\.save archive nor a safetensors file"),
    }
    (tmp_path / "r.bin").write_bytes(random.Random(0).randbytes(4096))
    for case, (path, pattern) in cases.items():
        message = refusal(path)
        assert re.search(pattern, message), (case, message)


def test_views_past_their_storage_and_short_records_are_refused(tmp_path: Path) -> None:
    data = randn(2, 768).numpy().tobytes()
    s = FakeStorage(2 * 768)
    past = crafted(tmp_path / "past.pt", s, FakeTensor(s, 1, (2, 768), (768, 1)), data)
    assert "reaches past its storage of 1536 elements" in refusal(past)
    strided = crafted(tmp_path / "str.pt", s, FakeTensor(s, 0, (2, 768), (768, 2)), data)
    assert "reaches past its storage" in refusal(strided)
    # overlapping rows that stay inside the storage are what torch makes of them
    overlap = crafted(tmp_path / "ovl.pt", s, FakeTensor(s, 0, (2, 768), (1, 2)), data)
    want = torch.load(overlap, weights_only=True)["string_to_param"]["*"]
    assert torch.equal(round_trip(overlap)["emb_params"], want)
    big = FakeStorage(4 * 768)
    short = crafted(tmp_path / "short.pt", big, FakeTensor(big, 0, (2, 768), (768, 1)), data)
    assert "holds 6144 bytes, its storage needs 12288" in refusal(short)
    bad = crafted(tmp_path / "bad.pt", s, FakeTensor(s, 0, (2, 768), (768,)), data)
    assert "not an embedding file (a malformed tensor" in refusal(bad)


# --- is_embedding ---------------------------------------------------------------------------


def test_is_embedding_for_embeddings_and_embeddings_refused_for_their_own_reasons(
    tmp_path: Path,
) -> None:
    v = randn(2, 768)
    yes = [
        write_pt(tmp_path / "a.pt", a1111(v)),
        write_pt(tmp_path / "b.bin", {"<t>": v[0].clone()}),
        write_st(tmp_path / "c.st", {"emb_params": v}),
        write_st(tmp_path / "d.st", {"clip_l": v, "clip_g": randn(2, 1280)}),
        write_pt(tmp_path / "sd2.pt", a1111(randn(1, 1024))),  # refused, naming SD2
        write_pt(tmp_path / "old.pt", a1111(v), _use_new_zipfile_serialization=False),
        write_pt(tmp_path / "two.pt", {"string_to_param": {"*": v, "+": v}}),
    ]
    for path in yes:
        assert is_embedding(path), path


def test_is_embedding_is_false_for_checkpoints_loras_and_other_files(tmp_path: Path) -> None:
    from workers.engine.tiny import save_safetensors

    # a checkpoint in the original single-file layout (a few of SD1's real tensor names)
    ckpt = tmp_path / "model.safetensors"
    save_safetensors(
        {
            "model.diffusion_model.input_blocks.0.0.weight": randn(4, 4, 3, 3),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (
                randn(8, 768)
            ),
            "first_stage_model.decoder.conv_in.weight": randn(4, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
                randn(16, 768)
            ),
        },
        ckpt,
        {"farm.family": "sd1"},
    )
    assert probe_engine(ckpt) == "sd1"
    lora = write_st(
        tmp_path / "lora.safetensors",
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": randn(4, 768),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": randn(3072, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
        },
    )
    assert probe_engine(lora) == "lora"
    one_lora_layer = write_st(tmp_path / "l1.st", {"x.lora_down.weight": randn(4, 320, 3, 3)})
    # one 2-D tensor 768 wide, as an embedding's, but under a dotted tensor name (LoHa)
    one_loha = write_st(tmp_path / "loha.st", {"lora_unet_x.hada_w1_a": randn(4, 768)})
    ckpt_pt = write_pt(tmp_path / "m.ckpt", {"state_dict": {"a.weight": randn(2, 768)}})
    module = write_pt(tmp_path / "module.pt", torch.nn.Linear(768, 2))
    rand = tmp_path / "random.bin"
    rand.write_bytes(random.Random(1).randbytes(100_000))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("{ not json")
    for path in (ckpt, lora, one_lora_layer, one_loha, ckpt_pt, module, rand, empty, text):
        assert not is_embedding(path), path
    with pytest.raises(OSError):
        is_embedding(tmp_path / "missing.pt")


def test_reads_and_converts_with_torch_and_numpy_unimportable(tmp_path: Path) -> None:
    vec = randn(2, 768, dtype=torch.float16, seed=13)
    pt = write_pt(tmp_path / "style.pt", a1111(vec))
    xl = write_st(tmp_path / "xl.st", {"clip_l": randn(1, 768), "clip_g": randn(1, 1280)})
    out = tmp_path / "out.safetensors"
    script = f"""
import sys
sys.modules["torch"] = sys.modules["numpy"] = None  # import torch / numpy now fail
from farm.embedding_files import is_embedding, read_embedding, to_safetensors
assert is_embedding({str(pt)!r}) and is_embedding({str(xl)!r})
assert read_embedding({str(xl)!r}).family == "sdxl"
open({str(out)!r}, "wb").write(to_safetensors(read_embedding({str(pt)!r})))
assert not any(m.startswith(("torch", "numpy")) for m in sys.modules if sys.modules[m])
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    assert torch.equal(load(out.read_bytes())["emb_params"], vec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_big_endian_archive_is_byteswapped(tmp_path: Path, dtype: Any) -> None:
    vec = randn(2, 768, dtype=dtype, seed=14)
    little = write_pt(tmp_path / "little.pt", {"emb_params": vec})
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif info.filename.endswith("/data/0"):
                ints = vec.view(torch.int16 if vec.element_size() == 2 else torch.int32)
                data = ints.numpy().byteswap().tobytes()
            dst.writestr(info.filename, data)
    assert torch.equal(torch.load(big, weights_only=True)["emb_params"], vec)
    assert torch.equal(round_trip(big)["emb_params"], vec)
