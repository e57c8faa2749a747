"""A validating, memory-mapping reader for safetensors files.

Why our own reader: the `safetensors` package's NumPy API copies every tensor into RAM; we map the
file once and hand out read-only views, so a model loads fast and its weights are not held twice.
A model folder may come from anywhere, so this reader checks what the audited Rust reader checks
before it trusts a single byte:

    file  = u64 little-endian N | N bytes of JSON header | data section
    header = {name: {"dtype": D, "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}

- N is within the file and below a sane bound (100 MB);
- the header is a JSON object with no duplicate names, every entry well formed;
- each tensor's byte range equals itemsize(dtype) × prod(shape), computed in Python ints (np.prod
  wraps around on overflow);
- the ranges lie inside the data section and, sorted, tile it exactly: no overlap, no hole, no tail.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ModelNotFoundError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> NumPy dtype (little endian). BF16 has no NumPy dtype: it is handed out as
# its raw uint16 bits; `to_float32` widens it.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class SafetensorsFile:
    """An open, validated safetensors file. `tensor(name)` returns a read-only memory-mapped view."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"weights file not found: {self.path}")
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise CheckpointError(f"{self.path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{self.path.name}: truncated or corrupt safetensors file "
                                      f"(header length {n}, file has {size} bytes)")
            raw = f.read(n)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._data_start = 8 + n
        self.entries, self.metadata = _parse_header(raw, size - self._data_start, self.path.name)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, name):
        return name in self.entries

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        count = (end - begin) // DTYPES[dtype].itemsize
        arr = np.frombuffer(self._mm, dtype=DTYPES[dtype], count=count, offset=self._data_start + begin)
        return arr.reshape(shape)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def release_pages(self) -> None:
        """Drop this process's mapping of pages already read (they stay in the OS page cache and
        fault back in if touched): after load-time copies, the RSS no longer counts them twice."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"duplicate name {k!r} in safetensors header")
        d[k] = v
    return d


def _parse_header(raw: bytes, data_len: int, fname: str):
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{fname}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{fname}: safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fname}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{fname}: __metadata__ must map names to strings")
    entries = {}
    for name, e in header.items():
        entries[name] = _parse_entry(name, e, fname)
    _check_tiling(entries, data_len, fname)
    return entries, metadata


def _parse_entry(name, e, fname):
    bad = CheckpointError(f"{fname}: tensor {name!r} has a malformed header entry: {e!r}"[:300])
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise bad
    dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{fname}: tensor {name!r} has unsupported dtype {dtype!r}")
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)
    if not ints(shape) or not ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
        raise bad
    nbytes = DTYPES[dtype].itemsize
    for dim in shape:          # Python ints: no wrap-around
        nbytes *= dim
    if offs[1] - offs[0] != nbytes:
        raise CheckpointError(
            f"{fname}: tensor {name!r} spans {offs[1] - offs[0]} bytes but {dtype} {shape} needs {nbytes}")
    return dtype, tuple(shape), offs[0], offs[1]


def _check_tiling(entries, data_len, fname):
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a hole before it"
            raise CheckpointError(f"{fname}: tensor {name!r} {what} (corrupt or crafted file)")
        pos = end
    if pos != data_len:
        if pos > data_len:
            raise CheckpointError(
                f"{fname}: truncated: tensors need {pos} data bytes, the file has {data_len}")
        raise CheckpointError(f"{fname}: {data_len - pos} unexplained bytes after the last tensor")


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """Widen F16/BF16/F32 weights to a float32 array (a view for F32, else one copy)."""
    if st_dtype == "F32":
        return arr
    if st_dtype == "F16":
        return arr.astype(np.float32)
    if st_dtype == "BF16":
        # bf16 is the top half of an fp32: shift its 16 bits into place.
        return (arr.astype(np.uint32) << 16).view(np.float32)
    raise CheckpointError(f"expected a floating-point weight, got dtype {st_dtype}")


# Our dtype name for a NumPy dtype: the inverse of DTYPES (BF16 is written by its writers as raw bits
# only by name; a uint16 array is U16 nowhere here, so it is not offered).
_TAGS = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
         np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
         np.dtype("?"): "BOOL"}


def write_file(path, tensors: dict, metadata: dict | None = None, rank=None) -> None:
    """Write {name: array} as a safetensors file, one tensor at a time (nothing is copied into one
    big buffer). Data order: larger item sizes first, so every tensor is aligned to its item size
    (the data section starts 8-aligned), then by `rank(name)` (default: as given). Readers sort by
    offset, so any order is valid; ours lets runtime/decode.py view stacked int4 weights in place
    (formats/tensors.storage_rank)."""
    arrays = {}
    for name, t in tensors.items():
        a = np.asarray(t)
        if a.dtype.newbyteorder("<") not in _TAGS:
            raise CheckpointError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        arrays[name] = a
    pos_of = {name: i for i, name in enumerate(arrays)}
    key = lambda n: (-arrays[n].dtype.itemsize, rank(n) if rank else (), pos_of[n])
    order = sorted(arrays, key=key)
    header, pos = {"__metadata__": dict(metadata or {})}, 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _TAGS[a.dtype.newbyteorder("<")], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            # C order, little endian, as the header says (a Fortran-ordered w[:, idx] would read back transposed)
            a = np.ascontiguousarray(arrays[name], dtype=arrays[name].dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
