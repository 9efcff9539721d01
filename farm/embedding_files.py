"""Textual-inversion embedding files read and converted without torch or numpy.

Read, by content rather than by name:

- ``torch.save`` zip archives (A1111 ``.pt``: ``string_to_param: {'*': (n, 768)}`` with
  ``name``, ``step``, ``string_to_token``...; diffusers ``learned_embeds.bin``:
  ``{"<token>": (768,) or (n, 768)}``; an ``nn.ParameterDict`` as ``string_to_param``, as
  the original textual-inversion code saved it). The pickle goes through an unpickler that
  resolves only the few globals such files need (tensor rebuilders, ``torch.*Storage``,
  ``collections.OrderedDict``, ``set``, ``ParameterDict``), each to a stand-in of this
  module, so a crafted pickle can call nothing; the tensors' bytes are then read from the
  archive's ``data/<key>`` records, strided views gathered element by element.
- safetensors: A1111's ``emb_params`` (n, 768), SDXL's ``clip_l`` (n, 768) + ``clip_g``
  (n, 1280), diffusers' one key named after the token.

Whatever the source, the result is one layout (``EmbeddingFile``): SD1 ``emb_params`` of
shape (n, 768), SDXL ``clip_l`` (n, 768) and ``clip_g`` (n, 1280), each in its file's
dtype, as raw little-endian C-contiguous bytes, which ``to_safetensors`` writes out.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import math
import pickle
import struct
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from farm.models import read_safetensors_header

SD1_WIDTH = 768
SDXL_L_WIDTH = 768
SDXL_G_WIDTH = 1280
SD2_WIDTH = 1024

#: safetensors dtype name -> bytes per element
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1,
}  # fmt: skip
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

#: torch's typed storage classes, as pickled, -> safetensors dtype name
_STORAGES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16",
    "BFloat16Storage": "BF16", "LongStorage": "I64", "IntStorage": "I32",
    "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8", "BoolStorage": "BOOL",
}  # fmt: skip

_MAX_PICKLE = 64 * 1024 * 1024  # data.pkl of a checkpoint is well under this
_MAX_STORAGE = 256 * 1024 * 1024  # an embedding is a few hundred KiB
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's pre-1.6 (non-zip) format


class EmbeddingFileError(ValueError):
    """A file that is not an embedding the farm can use; the message says why."""


class _NotEmbedding(EmbeddingFileError):
    """Refused because the file is not an embedding at all (a checkpoint, a LoRA, other)."""


@dataclass(frozen=True)
class EmbeddingFile:
    """An embedding in the layout workers read: ``family`` "sd1" (tensor ``emb_params``
    of shape (vectors, 768)) or "sdxl" (``clip_l`` (vectors, 768), ``clip_g`` (vectors,
    1280)); each tensor as (safetensors dtype, shape, raw little-endian C-order bytes)."""

    family: str
    vectors: int
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]


# --- stand-ins for what a torch pickle may ask for ---------------------------------------


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` and the like resolve to: a dtype, nothing callable."""

    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


class _Tensor:
    """A tensor as a pickle describes it; its bytes are read only when asked for."""

    def __init__(self, dtype: str, shape: tuple[int, ...], read: Any) -> None:
        self.dtype, self.shape, self._read = dtype, shape, read

    def data(self) -> bytes:
        return self._read()


class _ParameterDict:
    """``torch.nn.ParameterDict`` (or any module state) as a plain holder of its state."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0]
        params = state.get("_parameters") if isinstance(state, dict) else None
        self.parameters = params if isinstance(params, dict) else {}


class _TensorType:
    """``torch.Tensor`` as ``_rebuild_from_type_v2`` names it."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ints(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(_int(v) for v in value)


class _Archive:
    """The records of one torch zip archive and its storages' bytes."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, big_endian: bool) -> None:
        self.zf, self.prefix, self.big_endian = zf, prefix, big_endian
        self.storages: dict[str, _Storage] = {}
        self._bytes: dict[str, bytes] = {}

    def storage_bytes(self, storage: _Storage) -> bytes:
        if storage.key in self._bytes:
            return self._bytes[storage.key]
        name = f"{self.prefix}data/{storage.key}"
        size = storage.numel * ITEMSIZE[storage.dtype]
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise EmbeddingFileError(f"a damaged torch file: no record {name}") from None
        if info.file_size < size:
            raise EmbeddingFileError(
                f"a damaged torch file: {name} holds {info.file_size} bytes, "
                f"its storage needs {size}"
            )
        if size > _MAX_STORAGE:
            raise EmbeddingFileError(
                f"a tensor storage of {size} bytes: too large for an embedding"
            )
        with self.zf.open(info) as fh:
            raw = fh.read(size)
        if self.big_endian and ITEMSIZE[storage.dtype] > 1:
            raw = _byteswap(raw, ITEMSIZE[storage.dtype])
        self._bytes[storage.key] = raw
        return raw

    def rebuild(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
        """``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``) on a stand-in."""
        if not (isinstance(storage, _Storage) and _int(offset) and _ints(size) and _ints(stride)):
            raise _NotEmbedding("not an embedding file (a malformed tensor in its pickle)")
        shape, strides = tuple(size), tuple(stride)
        if len(shape) != len(strides):
            raise _NotEmbedding("not an embedding file (a malformed tensor in its pickle)")
        numel = math.prod(shape)
        if (
            numel
            and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
            >= storage.numel
        ):
            raise EmbeddingFileError(
                f"a tensor of shape {list(shape)} (offset {offset}, strides {list(strides)}) "
                f"reaches past its storage of {storage.numel} elements: a damaged file"
            )
        itemsize = ITEMSIZE[storage.dtype]

        def read() -> bytes:
            return _gather(self.storage_bytes(storage), itemsize, offset, shape, strides)

        return _Tensor(storage.dtype, shape, read)


def _byteswap(raw: bytes, itemsize: int) -> bytes:
    code = next(c for c in "HILQ" if array(c).itemsize == itemsize)
    arr = array(code)
    arr.frombytes(raw)
    arr.byteswap()
    return arr.tobytes()


def _gather(raw: bytes, itemsize: int, offset: int, shape: tuple[int, ...],
            strides: tuple[int, ...]) -> bytes:  # fmt: skip
    """The C-order bytes of the view (offset, shape, strides in elements) of ``raw``."""
    numel = math.prod(shape)
    if numel == 0:
        return b""
    contiguous, expect = True, 1
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != expect:
            contiguous = False
        expect *= n
    if contiguous:
        return raw[offset * itemsize : (offset + numel) * itemsize]
    *lead, last = shape
    *lead_strides, last_stride = strides
    out = bytearray()
    for index in itertools.product(*(range(n) for n in lead)):
        start = offset + sum(i * s for i, s in zip(index, lead_strides, strict=True))
        if last_stride == 1:
            out += raw[start * itemsize : (start + last) * itemsize]
        else:
            for j in range(last):
                at = (start + j * last_stride) * itemsize
                out += raw[at : at + itemsize]
    return bytes(out)


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals an embedding's pickle needs, each to a stand-in."""

    def __init__(self, file: BinaryIO, archive: _Archive | None) -> None:
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name == "set":
            return set
        if module == "torch.nn.modules.container" and name == "ParameterDict":
            return _ParameterDict
        if module == "torch" and name == "Tensor":
            return _TensorType
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild
        if module == "torch._utils" and name in (
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        ):
            return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        raise _NotEmbedding(
            f"not an embedding file (its pickle asks for {module}.{name}, "
            "which an embedding does not hold)"
        )

    def _rebuild(self, *args: Any) -> _Tensor:
        if self.archive is None:  # a legacy pickle, only looked at, never read
            storage, size = (args[0], args[2]) if len(args) >= 4 else (None, None)
            if not (isinstance(storage, _Storage) and _ints(size)):
                raise _NotEmbedding("not an embedding file (a malformed tensor in its pickle)")
            return _Tensor(storage.dtype, tuple(size), lambda: b"")
        return self.archive.rebuild(*args)

    def persistent_load(self, pid: Any) -> Any:
        # zip: ('storage', type, key, location, numel); legacy: (..., size, view_metadata)
        if not (
            isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[3], str) and _int(pid[4])
        ):  # fmt: skip
            raise _NotEmbedding("not an embedding file (a malformed storage in its pickle)")
        if self.archive is None:
            return _Storage(pid[1].dtype, pid[2], pid[4])
        storages = self.archive.storages
        if pid[2] not in storages:
            storages[pid[2]] = _Storage(pid[1].dtype, pid[2], pid[4])
        return storages[pid[2]]


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    if not isinstance(data, _Tensor):
        raise _NotEmbedding("not an embedding file (a malformed parameter in its pickle)")
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    rebuilds = getattr(func, "__func__", None) is _Unpickler._rebuild
    if new_type is not _TensorType or not rebuilds or not isinstance(args, tuple):
        raise _NotEmbedding("not an embedding file (a tensor subclass in its pickle)")
    return func(*args)


def _unpickle(data: BinaryIO, archive: _Archive | None) -> Any:
    try:
        return _Unpickler(data, archive).load()
    except EmbeddingFileError:
        raise
    except Exception as exc:  # a malformed or hostile pickle: anything may go wrong
        raise _NotEmbedding(f"not an embedding file (its pickle does not load: {exc})") from None


# --- sources --------------------------------------------------------------------------


def _torch_zip(path: Path) -> tuple[Any, _Archive]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _NotEmbedding(f"not an embedding file (a damaged zip archive: {exc})") from None
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise _NotEmbedding("not an embedding file (a zip archive but not one torch.save wrote)")
    prefix = pickles[0].removesuffix("data.pkl")
    info = zf.getinfo(pickles[0])
    if info.file_size > _MAX_PICKLE:
        raise _NotEmbedding("not an embedding file (its pickle is far too large)")
    big_endian = False
    if f"{prefix}byteorder" in zf.namelist():
        order = zf.read(f"{prefix}byteorder")
        if order not in (b"little", b"big"):
            raise EmbeddingFileError(f"a torch file of unknown byte order {order!r}")
        big_endian = order == b"big"
    archive = _Archive(zf, prefix, big_endian)
    return _unpickle(io.BytesIO(zf.read(info)), archive), archive


def _legacy_object(fh: BinaryIO) -> Any:
    """The object a pre-1.6 torch.save pickled (its tensors unread), or raise."""
    if _unpickle(fh, None) != _LEGACY_MAGIC:
        raise _NotEmbedding("not an embedding file (a pickle, but not one torch.save wrote)")
    _unpickle(fh, None)  # protocol version
    _unpickle(fh, None)  # sys info
    return _unpickle(fh, None)


class _SafeTensor:
    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end

    def data(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            raw = fh.read(self.end - self.start)
        if len(raw) != self.end - self.start:
            raise EmbeddingFileError("a truncated safetensors file")
        return raw


def _safetensors(path: Path, size: int) -> dict[str, _SafeTensor]:
    try:
        header = read_safetensors_header(path)
    except ValueError as exc:
        raise _NotEmbedding(f"not an embedding file ({exc})") from None
    if not isinstance(header, dict):
        raise _NotEmbedding("not an embedding file (a malformed safetensors header)")
    with open(path, "rb") as fh:
        base = 8 + struct.unpack("<Q", fh.read(8))[0]
    out: dict[str, _SafeTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in ITEMSIZE
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        if not (ok and _ints(shape) and _ints(offsets) and len(offsets) == 2):
            raise _NotEmbedding(f"not an embedding file (a malformed safetensors entry {name!r})")
        start, end = base + offsets[0], base + offsets[1]
        if end - start != math.prod(shape) * ITEMSIZE[entry["dtype"]] or end > size:
            raise EmbeddingFileError(f"a damaged safetensors file: tensor {name!r} does not fit")
        out[name] = _SafeTensor(path, entry["dtype"], tuple(shape), start, end)
    return out


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _load(path: Path, read_legacy: bool) -> Any:
    """The file's top-level mapping of names to tensors (stand-ins), by its content."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
        if head.startswith(_ZIP_MAGIC):
            return _torch_zip(path)[0]
        if _looks_like_safetensors(head, size):
            return _safetensors(path, size)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            fh.seek(0)
            obj = _legacy_object(fh)
            if read_legacy:
                return obj
            _layout(obj)  # says first when it is no embedding at all
            raise EmbeddingFileError(
                "an embedding in torch's legacy (pre-1.6, non-zip) format, which the farm "
                "does not read: re-save it with a recent torch (torch.save(torch.load(f), f)) "
                "or convert it to safetensors"
            )
        if head[257:262] == b"ustar":
            raise EmbeddingFileError(
                "a torch file in the old tar format, which the farm does not read: re-save it "
                "with a recent torch or convert it to safetensors"
            )
    raise _NotEmbedding(
        "not an embedding file (neither a torch.save archive nor a safetensors file)"
    )


# --- layout -------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    return isinstance(value, _Tensor | _SafeTensor)


def _layout(obj: Any) -> tuple[str, dict[str, Any]]:
    """Which layout a file's top-level object has: ("single", {key: tensor}) or ("sdxl",
    {"clip_l": ..., "clip_g": ...}); raises for what is no embedding or a broken one."""
    if not isinstance(obj, dict):
        raise _NotEmbedding(f"not an embedding file (it holds a {type(obj).__name__}, not a dict)")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if isinstance(params, _ParameterDict):
            params = params.parameters
        if not isinstance(params, dict):
            raise EmbeddingFileError("an embedding whose string_to_param is not a dict")
        if len(params) != 1:
            keys = ", ".join(repr(k) for k in params)
            raise EmbeddingFileError(
                f"an embedding whose string_to_param holds {len(params)} vector sets "
                f"({keys or 'none'}); the farm reads files of exactly one"
            )
        (key, tensor), = params.items()  # fmt: skip
        if not _is_tensor(tensor):
            raise EmbeddingFileError(f"an embedding whose string_to_param[{key!r}] is no tensor")
        return "single", {f"string_to_param[{key!r}]": tensor}
    if "clip_l" in obj or "clip_g" in obj:
        missing = [k for k in ("clip_l", "clip_g") if not _is_tensor(obj.get(k))]
        if missing:
            raise EmbeddingFileError(
                f"an SDXL embedding without a {missing[0]} tensor; SDXL embeddings hold "
                "clip_l (768 wide) and clip_g (1280 wide)"
            )
        return "sdxl", {"clip_l": obj["clip_l"], "clip_g": obj["clip_g"]}
    if "emb_params" in obj:
        if not _is_tensor(obj["emb_params"]):
            raise EmbeddingFileError("an embedding whose emb_params is no tensor")
        return "single", {"emb_params": obj["emb_params"]}
    if len(obj) == 1:
        (key, tensor), = obj.items()  # fmt: skip
        # diffusers names it after its token ("<cat-toy>"); a lone tensor of a model or a
        # LoRA has a dotted name (".lora_down.weight", ".hada_w1_a")
        token = not isinstance(key, str) or "." not in key
        if (
            token
            and _is_tensor(tensor)
            and len(tensor.shape) in (1, 2)
            and tensor.dtype in FLOAT_DTYPES
        ):
            return "single", {repr(key) if not isinstance(key, str) else key: tensor}
    raise _NotEmbedding(
        "not an embedding file (none of string_to_param, emb_params, clip_l/clip_g, "
        "nor a single tensor)"
    )


def _matrix(name: str, tensor: Any) -> tuple[int, int]:
    if tensor.dtype not in FLOAT_DTYPES:
        raise EmbeddingFileError(f"{name} is of dtype {tensor.dtype}; embeddings are floats")
    if len(tensor.shape) == 1:
        n, width = 1, tensor.shape[0]
    elif len(tensor.shape) == 2:
        n, width = tensor.shape
    else:
        raise EmbeddingFileError(
            f"{name} has shape {list(tensor.shape)}; an embedding is (vectors, width)"
        )
    if n == 0 or width == 0:
        raise EmbeddingFileError(f"{name} is empty (shape {list(tensor.shape)})")
    return n, width


def _check(
    kind: str, tensors: dict[str, Any]
) -> tuple[str, int, dict[str, tuple[Any, tuple[int, int]]]]:
    """(family, vectors, {output name: (tensor, output shape)}) or raise."""
    if kind == "sdxl":
        (nl, wl), (ng, wg) = (
            _matrix("clip_l", tensors["clip_l"]),
            _matrix("clip_g", tensors["clip_g"]),
        )
        if (wl, wg) != (SDXL_L_WIDTH, SDXL_G_WIDTH):
            raise EmbeddingFileError(
                f"an SDXL embedding with clip_l {wl} and clip_g {wg} wide; they must be "
                f"{SDXL_L_WIDTH} and {SDXL_G_WIDTH}"
            )
        if nl != ng:
            raise EmbeddingFileError(
                f"an SDXL embedding with {nl} clip_l vectors but {ng} clip_g vectors; "
                "they must be as many"
            )
        out = {"clip_l": (tensors["clip_l"], (nl, wl)), "clip_g": (tensors["clip_g"], (ng, wg))}
        return "sdxl", nl, out
    ((name, tensor),) = tensors.items()
    n, width = _matrix(name, tensor)
    if width == SD2_WIDTH:
        raise EmbeddingFileError(
            f"an SD2.x embedding ({name} is {width} wide); the farm does not render "
            "SD2 models, only SD1 (768 wide) and SDXL (clip_l 768 + clip_g 1280)"
        )
    if width == SDXL_G_WIDTH:
        raise EmbeddingFileError(
            f"{name} is {width} wide, the clip_g half of an SDXL embedding alone; an SDXL "
            "embedding holds clip_l (768) and clip_g (1280)"
        )
    if width != SD1_WIDTH:
        raise EmbeddingFileError(
            f"{name} is {width} wide; the farm reads SD1 embeddings (768 wide) and SDXL "
            "ones (clip_l 768 + clip_g 1280)"
        )
    return "sd1", n, {"emb_params": (tensor, (n, width))}


# --- public -------------------------------------------------------------------------------


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read a textual-inversion embedding of any layout the farm knows, into the one layout
    workers read; ``EmbeddingFileError`` says what is wrong with any other file."""
    path = Path(path)
    family, vectors, chosen = _check(*_layout(_load(path, read_legacy=False)))
    tensors = {}
    for name, (tensor, shape) in chosen.items():
        tensors[name] = (tensor.dtype, shape, tensor.data())
    return EmbeddingFile(family=family, vectors=vectors, tensors=tensors)


def is_embedding(path: str | Path) -> bool:
    """Whether a file is laid out as a textual-inversion embedding (those ``read_embedding``
    reads, and those it refuses for an embedding's reasons: SD2 width, legacy torch format,
    several vector sets...). Reads headers and pickles only, never tensor data; False for
    checkpoints, LoRAs and anything else, raising only where the file cannot be opened."""
    path = Path(path)
    with open(path, "rb"):
        pass  # an unreadable file raises here
    try:
        _layout(_load(path, read_legacy=True))
    except _NotEmbedding:
        return False
    except EmbeddingFileError:
        return True
    except Exception:  # noqa: BLE001 - a probe: whatever else the file does, it is none
        return False
    return True


def to_safetensors(emb: EmbeddingFile, metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``emb.tensors`` (and ``metadata`` as its
    ``__metadata__``), tensors sorted by name, header padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata maps str to str")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks, offset = [], 0
    for name in sorted(emb.tensors):
        dtype, shape, data = emb.tensors[name]
        if len(data) != math.prod(shape) * ITEMSIZE[dtype]:
            raise ValueError(f"{name}: {len(data)} bytes for a {dtype} tensor of shape {shape}")
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(chunks)
