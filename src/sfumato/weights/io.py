"""Reading checkpoint files safely and lazily, writing safetensors atomically, choosing EMA weights.

``open_checkpoint`` returns a :class:`Checkpoint`: key names, shapes and dtypes come from the file's
index alone, and ``get`` reads one tensor at a time with plain positioned reads into a tensor it owns,
so peak memory is the loaded model plus one tensor whatever the file or target dtype, and nothing in
the file that is never asked for (optimizer state, the other copy of EMA weights) is read.
``get(..., share=True)`` instead returns a tensor over a private (copy-on-write) memory map of the
file when no conversion is needed (same dtype, CPU, contiguous, aligned): loading is then no copy at
all, pages arrive from the page cache on first use, stay reclaimable file pages, and a write to such a
tensor never reaches the file. The loaders use it; anything needing a cast still reads.

- ``.safetensors``: the header is validated here before anything is trusted (length, JSON, dtypes,
  every tensor's byte range inside the file); format: https://github.com/huggingface/safetensors.
  Casting reads go through positioned reads, not the map: a mapping keeps every touched page in the
  process RSS until it is closed, so an fp16 file cast to fp32 through an mmap peaked at 3x the file
  size in a measurement here.
- ``.ckpt`` / ``.pt`` / ``.bin`` (torch zip or legacy pickle): never through ``torch.load``. The pickle
  is run by a restricted unpickler whose allow-list maps each accepted global to a function of ours
  that records where a tensor lies instead of building it (torch's ``_rebuild_tensor_v2`` and kin),
  or to an inert value (``OrderedDict``, dtypes, numpy scalars). Every other global, ``os.system`` or
  ``builtins.eval`` alike, raises :class:`UnsafePickleError` before anything is called; the payload
  cannot run because no allowed callable executes code or unpickles a nested stream. Tensor bytes
  are then read from the zip records (torch stores them uncompressed) or the legacy storage section.
  This is AUTOMATIC1111's ``modules/safe.py`` allow-list applied to a lazy reader.

EMA: LDM training checkpoints (``LitEma``) hold ``model.diffusion_model.<name>`` and
``model_ema.<name without "model." and without dots>``; see :func:`select_ema`.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import json
import math
import mmap
import os
import pickle
import secrets
import struct
import zipfile
from collections.abc import Iterable, Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from sfumato.errors import CheckpointError, InvalidParameterError, UnsafePickleError

__all__ = ["Checkpoint", "open_checkpoint", "read_tensors", "write_safetensors", "select_ema", "ema_key"]

# safetensors dtype names (https://github.com/huggingface/safetensors, ``Dtype``).
_ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                       ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
                       ("BOOL", "bool"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                       ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
    if hasattr(torch, attr)  # the unsigned ones arrived in torch 2.3
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
_STAGING_BYTES = 8 * 1024 * 1024  # casting / device reads go through this much host memory at a time

# torch's pickled storage class names (``torch.FloatStorage`` ...) -> element dtype.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,  # UntypedStorage: bytes; v3 names the dtype
}


# --- tensor locations -----------------------------------------------------------------------------

class _Storage:
    """One pickled storage: its element dtype and count, and where its bytes start in the file."""

    __slots__ = ("dtype", "numel", "offset")

    def __init__(self, dtype: torch.dtype, numel: int, offset: int | None) -> None:
        self.dtype, self.numel, self.offset = dtype, numel, offset  # offset None until known (legacy)


class _TensorRef:
    """Where one tensor lies: a strided view of a storage's bytes. Nothing is read until ``Checkpoint.get``."""

    __slots__ = ("storage", "elem_offset", "shape", "stride", "dtype")

    def __init__(self, storage: _Storage, elem_offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.storage, self.elem_offset, self.shape, self.stride, self.dtype = storage, elem_offset, shape, stride, dtype

    def __setstate__(self, state: object) -> None:
        # A pickle may BUILD onto any object it made; ours must not be rewritten after validation.
        raise _Rejected("BUILD on a tensor")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def span(self) -> int:
        """Elements of the storage the view touches, from ``elem_offset``."""
        if self.numel == 0:
            return 0
        return 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride, strict=True))

    @property
    def contiguous(self) -> bool:
        return self.stride == _contiguous_stride(self.shape)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class Checkpoint:
    """A lazily read flat state dict of one file: names, shapes and dtypes now, tensors on ``get``.

    ``metadata``: the safetensors ``__metadata__`` (or ``{}``); for pickles, the top-level scalar
    entries such as ``global_step`` and ``epoch``, as strings.
    """

    def __init__(self, path: Path, file: BinaryIO, tensors: dict[str, _TensorRef], metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self._file: BinaryIO | None = file
        self._tensors = tensors
        self._staging: Tensor | None = None
        self._map: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def _ref(self, key: str) -> _TensorRef:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._ref(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._ref(key).dtype

    def get(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
            share: bool = False) -> Tensor:
        """Read one tensor into memory it owns, cast to ``dtype`` (default: as stored), on ``device``.

        ``share``: when the tensor needs no conversion (stored dtype, CPU, contiguous, aligned), return it
        over a private copy-on-write memory map of the file instead: no read, no copy; writes stay in
        this process. The map lives as long as any tensor made from it, past ``close``.

        Same dtype on the CPU: read straight into the result. Otherwise the bytes pass through one
        small reused staging buffer, chunk by chunk, so no full-size temporary is ever allocated (with
        one, glibc's heap kept a tensor-sized hole per read: 1.5x the model in peak RSS when casting).
        """
        ref = self._ref(key)
        if self._file is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        assert ref.storage.offset is not None
        start = ref.storage.offset + ref.elem_offset * ref.dtype.itemsize
        dtype = dtype or ref.dtype
        device = torch.device(device)
        if (share and dtype == ref.dtype and device.type == "cpu" and ref.contiguous and ref.numel
                and start % ref.dtype.itemsize == 0):
            if self._map is None:
                try:
                    self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{self.path}: cannot map the file ({e})") from None
                from sfumato.weights.pages import register_map

                register_map(self._map)
            if POPULATE.get():
                _populate(self._map, start, ref.numel * ref.dtype.itemsize)
            return torch.frombuffer(self._map, dtype=ref.dtype, count=ref.numel, offset=start).view(ref.shape)
        if not ref.contiguous:  # only pickles have these (views of a larger storage): read the span, copy
            buf = torch.empty(ref.span * ref.dtype.itemsize, dtype=torch.uint8)
            _read_into(self._file, start, buf, self.path, key)
            view = buf.view(ref.dtype).as_strided(ref.shape, ref.stride)
            return view.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        out = torch.empty(ref.shape, dtype=dtype, device=device)
        if dtype == ref.dtype and device.type == "cpu":
            if out.numel():
                _read_into(self._file, start, out.reshape(-1).view(torch.uint8), self.path, key)
            return out
        flat, step = out.reshape(-1), _STAGING_BYTES // ref.dtype.itemsize
        if self._staging is None:
            self._staging = torch.empty(_STAGING_BYTES, dtype=torch.uint8)
        for i in range(0, ref.numel, step):
            n = min(step, ref.numel - i)
            chunk = self._staging[: n * ref.dtype.itemsize]
            _read_into(self._file, start + i * ref.dtype.itemsize, chunk, self.path, key)
            flat[i : i + n].copy_(chunk.view(ref.dtype))
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._staging = None
            self._map = None  # not closed: tensors made with share=True keep it alive until they go

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._tensors)} tensors)"


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python names it from 3.12
# whether ``Checkpoint.get(share=True)`` maps a tensor's pages in at once (the default) or leaves them to
# fault in on first use (a pipeline loaded for offload, which keeps most weights out of memory anyway)
POPULATE: contextvars.ContextVar[bool] = contextvars.ContextVar("sfumato_populate_pages", default=True)


def _populate(m: mmap.mmap, start: int, length: int) -> None:
    """Map a shared tensor's pages now, in one call, instead of one page fault at a time during the first
    step (0.4 s against 1.1 s for SD 1.5's 4.3 GB from the page cache, measured here). Reading pages does
    not break copy-on-write. Where the kernel has no such advice, the faults just happen later."""
    page = mmap.PAGESIZE
    first = start - start % page
    try:
        m.madvise(_MADV_POPULATE_READ, first, start + length - first)
    except (OSError, ValueError, AttributeError):
        pass


def read_tensors(path: str | os.PathLike, dtype: torch.dtype | None = None, *, share: bool = False
                 ) -> dict[str, Tensor]:
    """Every tensor of one file (``Checkpoint.get`` with ``dtype`` and ``share``), for the small files
    read whole: a diffusers component, an add-on."""
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.get(k, dtype=dtype, share=share) for k in ckpt.keys()}


def _read_into(f: BinaryIO, offset: int, buf: Tensor, path: Path, key: str) -> None:
    view = memoryview(buf.numpy())
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: truncated while reading {key!r} ({done} of {len(view)} bytes)")
        done += n


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a ``.safetensors``, torch zip (``.ckpt``/``.pt``/``.bin``) or legacy torch pickle file.

    Raises :class:`CheckpointError` (naming the file) when it is missing, unreadable, truncated or
    corrupt, and :class:`UnsafePickleError` when its pickle asks for anything outside the allow-list.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the Checkpoint, closed by it
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        if path.suffix.lower() == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
            tensors, metadata = _index_safetensors(f, path, size)
        elif head[:4] == b"PK\x03\x04":
            tensors, metadata = _index_torch_zip(f, path, size)
        else:
            tensors, metadata = _index_legacy_pickle(f, path, size)
    except BaseException:
        f.close()
        raise
    return Checkpoint(path, f, tensors, metadata)


# --- safetensors ------------------------------------------------------------------------------------

def _index_safetensors(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, _TensorRef], dict[str, str]]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file: {what}")

    if size < 8:
        raise bad(f"{size} bytes is too small for the 8-byte header length")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, _MAX_HEADER):
        raise bad(f"truncated or corrupt: header length says {n} bytes, file has {size - 8} after it")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, _TensorRef] = {}
    end_max = 0
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            ok = all(type(s) is int and s >= 0 for s in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"entry {key!r} is malformed: {info!r}")
        ref = _TensorRef(_Storage(dtype, (end - begin) // dtype.itemsize, data_start + begin), 0,
                         shape, _contiguous_stride(shape), dtype)
        if ref.numel * dtype.itemsize != end - begin:
            raise bad(f"tensor {key!r}: {info['dtype']} {list(shape)} needs {ref.numel * dtype.itemsize} bytes, "
                      f"its offsets give {end - begin}")
        tensors[key] = ref
        end_max = max(end_max, end)
    if end_max > data_size:
        raise bad(f"truncated: header says {end_max} bytes of data, file has {data_size}")
    return tensors, dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically.

    The file is written under a temporary name in the same folder and renamed over ``path`` only once
    complete, so a crash or error leaves the old file (or none), never half a file. Tensors are written
    one at a time from contiguous CPU copies, so views and tensors sharing storage need no care.
    """
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidParameterError("safetensors metadata must map str to str")
    for key, t in tensors.items():
        if not isinstance(t, Tensor) or t.dtype not in _ST_NAMES or t.is_meta:
            what = type(t).__name__ if not isinstance(t, Tensor) else f"{t.dtype} on {t.device}"
            raise InvalidParameterError(f"cannot write {key!r} ({what}) to {path}; supported dtypes: "
                                        f"{', '.join(str(d) for d in _ST_NAMES)}")
    # Widest dtypes first, so every tensor starts at a multiple of its element size (as safetensors does).
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in order:
                f.write(_tensor_bytes(tensors[key]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` in row-major order (a contiguous CPU copy when needed)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


# --- torch pickles ----------------------------------------------------------------------------------

class _Rejected(Exception):
    """Raised inside the unpickler; turned into UnsafePickleError naming the file."""


class _InertObject:
    """Stands in for a class allowed by name only (Lightning's ModelCheckpoint): the real class is never
    imported or called, its pickled state is kept as plain data."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: object) -> None:
        self.state = state


# ``torch.Tensor`` / ``Parameter`` as type tags for ``_rebuild_from_type_v2``: never the real, callable classes.
_TENSOR_TYPES = (object(), object())


def _int_tuple(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or not all(type(i) is int and i >= 0 for i in x):
        raise _Rejected(f"{what} {x!r} is not a tuple of non-negative ints")
    return tuple(x)


def _rebuild_tensor_v2(storage: object, storage_offset: object, size: object, stride: object,
                       requires_grad: object = False, backward_hooks: object = None, metadata: object = None,
                       *, dtype: torch.dtype | None = None) -> _TensorRef:
    """torch._utils._rebuild_tensor_v2's arguments -> a _TensorRef, checked against its storage.

    ``dtype`` (from v3) reads an untyped byte storage as that dtype; offsets then count its elements.
    """
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise _Rejected(f"_rebuild_tensor with storage {type(storage).__name__}, offset {storage_offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise _Rejected(f"size {shape} and stride {strides} differ in length")
    if dtype is None:
        dtype = storage.dtype
    elif storage.dtype != torch.uint8 and dtype != storage.dtype:
        raise _Rejected(f"dtype {dtype} over a {storage.dtype} storage")
    ref = _TensorRef(storage, storage_offset, shape, strides, dtype)
    if (storage_offset + ref.span) * dtype.itemsize > storage.numel * storage.dtype.itemsize:
        raise _Rejected(f"tensor {shape} at offset {storage_offset} overruns its storage of {storage.numel}")
    return ref


def _rebuild_tensor_v3(storage: object, storage_offset: object, size: object, stride: object,
                       requires_grad: object, backward_hooks: object, dtype: object, metadata: object = None
                       ) -> _TensorRef:
    if not isinstance(dtype, torch.dtype) or dtype.is_complex:
        raise _Rejected(f"_rebuild_tensor_v3 dtype {dtype!r}")
    return _rebuild_tensor_v2(storage, storage_offset, size, stride, dtype=dtype)


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object, state: object = None
                       ) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise _Rejected(f"parameter over {type(data).__name__}")
    return data


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> _TensorRef:
    # ``func`` came through find_class too, so calling it is no more than a REDUCE could do anyway.
    if not any(new_type is t for t in _TENSOR_TYPES) or not callable(func) or not isinstance(args, tuple):
        raise _Rejected("_rebuild_from_type_v2 with a non-tensor type")
    ref = func(*args)
    if not isinstance(ref, _TensorRef):
        raise _Rejected("_rebuild_from_type_v2 that builds no tensor")
    return ref


def _latin1_encode(obj: object, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise _Rejected(f"_codecs.encode with {encoding!r}")
    return obj.encode("latin1")


def _numpy_reconstruct(subtype: object, shape: object, dtype: object) -> object:
    import numpy as np

    if subtype is not np.ndarray or shape not in ((0,), [0]):  # the data comes by __setstate__
        raise _Rejected(f"numpy _reconstruct of {subtype!r} {shape!r}")
    return np.ndarray.__new__(np.ndarray, (0,), dtype)  # type: ignore[call-overload]


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    import numpy as np

    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("__builtin__", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): _latin1_encode,
        ("torch", "Size"): tuple,
        ("torch", "Tensor"): _TENSOR_TYPES[0],
        ("torch.nn.parameter", "Parameter"): _TENSOR_TYPES[1],
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        # Inert placeholder: old LDM training files pickle their checkpoint callback under "callbacks".
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _InertObject,
    }
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 spell it differently
        allowed[(mod, "scalar")] = multiarray.scalar
        allowed[(mod, "_reconstruct")] = _numpy_reconstruct
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = dtype  # a storage class stands for its dtype in persistent ids
    allowed[("torch.storage", "UntypedStorage")] = torch.uint8
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` answers only from the allow-list; ``persistent_load`` only makes _Storage records."""

    def __init__(self, file: BinaryIO, storage: Any) -> None:
        super().__init__(file, encoding="utf-8")
        self._allowed = _allowed_globals()
        self._storage = storage  # persistent id tuple -> _Storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" or not isinstance(pid[1], torch.dtype):
            raise _Rejected(f"persistent id {pid!r:.200}")
        return self._storage(pid)


def _unpickle(f: BinaryIO, path: Path, storage: Any) -> Any:
    try:
        return _RestrictedUnpickler(f, storage).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: refusing to load: the pickle asks for {e}, which is not a tensor, "
                                f"storage or plain container (convert trusted files to .safetensors)") from None
    except _Rejected as e:
        raise UnsafePickleError(f"{path}: refusing to load: {e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # the pickle module raises many kinds on corrupt input
        raise CheckpointError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _index_torch_zip(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, _TensorRef], dict[str, str]]:
    """torch.save's zip format: ``<archive>/data.pkl`` plus one uncompressed record per storage."""
    try:
        zf = zipfile.ZipFile(f)
        infos = {i.filename: i for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid torch zip checkpoint ({e}); truncated?") from None
    roots = [n[: -len("/data.pkl")] for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if any(n.endswith("constants.pkl") for n in infos):
        raise CheckpointError(f"{path}: a TorchScript archive, not a checkpoint (it would need torch.jit to run)")
    if len(roots) != 1:
        raise CheckpointError(f"{path}: a zip file but not a torch checkpoint (no single <archive>/data.pkl)")
    root = roots[0]
    order = infos.get(f"{root}/byteorder")
    if order is not None and zf.read(order).strip() not in (b"little", b""):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

    def storage(pid: tuple) -> _Storage:
        _, dtype, key, _location, numel = pid[:5]
        info = infos.get(f"{root}/data/{key}")
        if info is None or type(numel) is not int:
            raise CheckpointError(f"{path}: storage {key!r} is missing from the zip (truncated or corrupt)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: storage record {info.filename} is compressed; torch writes them "
                                  "stored (re-save the file with torch.save)")
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: storage {key!r} has {info.file_size} bytes, "
                                  f"expected {numel} x {dtype.itemsize}")
        return _Storage(dtype, numel, _record_offset(f, info, path, size))

    try:
        with zf.open(f"{root}/data.pkl") as pf:
            pkl = pf.read()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read {root}/data.pkl ({e}); truncated or corrupt") from None
    finally:
        zf.close()  # leaves ``f`` open: ZipFile only closes files it opened itself
    return _flatten(_unpickle(BytesIO(pkl), path, storage), path)


def _record_offset(f: BinaryIO, info: zipfile.ZipInfo, path: Path, size: int) -> int:
    """Byte offset of a stored zip record's data: after its local header (whose extra field may differ
    from the central directory's)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: zip record {info.filename} has a bad local header; corrupt")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise CheckpointError(f"{path}: truncated: record {info.filename} ends at byte "
                              f"{start + info.file_size}, file has {size}")
    return start


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _index_legacy_pickle(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, _TensorRef], dict[str, str]]:
    """torch.save(..., _use_new_zipfile_serialization=False): five pickles, then the storages' bytes,
    each preceded by its element count (torch/serialization.py ``_legacy_save``)."""
    storages: dict[str, _Storage] = {}

    def storage(pid: tuple) -> _Storage:
        if len(pid) != 6 or pid[5] is not None:
            raise CheckpointError(f"{path}: storage views (torch < 1.0 files) are not supported")
        _, dtype, key, _location, numel, _ = pid
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Rejected(f"persistent id {pid!r:.200}")
        st = storages.setdefault(key, _Storage(dtype, numel, None))
        if (st.dtype, st.numel) != (dtype, numel):
            raise _Rejected(f"storage {key!r} declared twice differently")
        return st

    f.seek(0)
    magic = _unpickle(f, path, storage)
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a safetensors, torch zip or torch pickle file")
    _unpickle(f, path, storage)  # protocol version
    sys_info = _unpickle(f, path, storage)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    obj = _unpickle(f, path, storage)
    keys = _unpickle(f, path, storage)
    if not isinstance(keys, list):
        raise CheckpointError(f"{path}: corrupt legacy checkpoint (storage key list is {type(keys).__name__})")
    pos = f.tell()
    for key in keys:
        st = storages.get(key) if isinstance(key, str) else None
        f.seek(pos)
        count = f.read(8)
        if st is None or len(count) != 8 or struct.unpack("<q", count)[0] != st.numel:
            raise CheckpointError(f"{path}: corrupt or truncated legacy checkpoint at storage {key!r}")
        st.offset = pos + 8
        pos = st.offset + st.numel * st.dtype.itemsize
        if pos > size:
            raise CheckpointError(f"{path}: truncated: storage {key!r} ends at byte {pos}, file has {size}")
    if any(st.offset is None for st in storages.values()):
        raise CheckpointError(f"{path}: corrupt legacy checkpoint (a tensor's storage has no data)")
    return _flatten(obj, path)


def _flatten(obj: Any, path: Path) -> tuple[dict[str, _TensorRef], dict[str, str]]:
    """Unwrap the containers: ``{"state_dict": {...}, "global_step": ...}`` (LDM/Lightning) or a plain
    dict of tensors; top-level scalars become metadata, other non-tensor entries are left out."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    metadata = {str(k): str(v) for k, v in obj.items()
                if isinstance(k, str) and type(v) in (int, float, str, bool)}
    inner = obj.get("state_dict")
    sd = inner if isinstance(inner, dict) else obj
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, _TensorRef)}
    if not tensors:  # one level down, as "outer.inner" (AUTOMATIC1111 embeddings: string_to_param.*)
        tensors = {f"{k}.{kk}": vv for k, v in sd.items() if isinstance(k, str) and isinstance(v, dict)
                   for kk, vv in v.items() if isinstance(kk, str) and isinstance(vv, _TensorRef)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    return tensors, metadata


# --- EMA ----------------------------------------------------------------------------------------------

_EMA = "model_ema."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
# LDM UNet name segments (openaimodel.py, attention.py), to split a dotless EMA name back into a key.
_UNET_WORDS = sorted(
    ("diffusion_model", "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out",
     "in_layers", "emb_layers", "out_layers", "skip_connection", "op", "conv", "norm", "norm1", "norm2", "norm3",
     "proj_in", "proj_out", "proj", "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out",
     "ff", "net", "weight", "bias"),
    key=len, reverse=True,
)
_TWO_INDICES = ("input_blocks", "output_blocks", "label_emb")  # `input_blocks.11.0`: the last index is one digit


def ema_key(key: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``."""
    return _EMA + key.removeprefix("model.").replace(".", "")


def _key_from_ema(key: str) -> str:
    """The inverse of :func:`ema_key` for LDM UNet names (dots are put back by the known name segments)."""
    rest, parts = key[len(_EMA):], []
    while rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits:
            run, rest = rest[:digits], rest[digits:]
            parts += [run[:-1], run[-1]] if parts and parts[-1] in _TWO_INDICES and len(run) > 1 else [run]
            continue
        word = next((w for w in _UNET_WORDS if rest.startswith(w)), None)
        if word is None:
            raise CheckpointError(f"EMA key {key!r}: cannot tell where the dots were at {rest!r}")
        parts.append(word)
        rest = rest[len(word):]
    return "model." + ".".join(parts)


def select_ema(keys: Iterable[str], *, use_ema: bool = True) -> dict[str, str]:
    """Where to read each tensor from: target key -> source key in the file.

    Every key outside ``model_ema.`` is a target. When ``use_ema`` and the file has the EMA twin of a
    ``model.*`` key (``ema_key``), that twin is its source; otherwise it is read from itself.
    ``model_ema.*`` keys are never targets (their bookkeeping ``decay``/``num_updates`` included). A file
    with EMA weights but no ``model.diffusion_model.*`` keys has only the EMA copy: its EMA keys are
    mapped back to their original names whatever ``use_ema`` says, as that is the only source there is.
    """
    keys = list(keys)
    present = set(keys)
    routes: dict[str, str] = {}
    for k in keys:
        if k.startswith(_EMA):
            continue
        twin = ema_key(k) if k.startswith("model.") else None
        routes[k] = twin if use_ema and twin in present else k
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        for k in keys:
            if k.startswith(_EMA) and k not in _EMA_BOOKKEEPING:
                routes[_key_from_ema(k)] = k
    return routes
