"""A lazy reader and a streaming writer of the safetensors format, in numpy (bfloat16 included).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the raw little-endian tensor bytes, offsets relative to the end of the header.

Why not the `safetensors` package: its numpy backend has no bfloat16 (the dtype of nearly every released
checkpoint), and its writer needs every tensor of a file in memory at once. Here a file is memory-mapped,
so slicing a tensor reads only the pages of that slice (each host reads just its own shards), and a file
is written one tensor at a time from a header planned up front.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's limit


def dtype_name(dtype) -> str:
    """The safetensors name ("F32", "BF16", ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent here; known: {sorted(_DTYPES)}")
    return _NAMES[dtype]


class SafetensorsFile:
    """One memory-mapped .safetensors file: `keys()`, `shape(name)`, `dtype(name)`, `get(name)`."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= _MAX_HEADER:
                raise ValueError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which is not supported")
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (nothing is read until it is sliced or copied)."""
        begin, end = self._entries[name]["data_offsets"]
        return self._data[begin:end].view(self.dtype(name)).reshape(self.shape(name))


def write_file(
    path: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a .safetensors file tensor by tensor, atomically (temp file + rename).

    Args:
      path: the output file.
      specs: (name, shape, dtype) of every tensor, in file order.
      produce: returns the tensor `name` as a numpy array of the declared shape and dtype; called once
        per tensor, in order, so at most one tensor is held at a time.
      metadata: string-to-string `__metadata__` (transformers requires {"format": "pt"}).
    """
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8-byte alignment
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in specs:
            x = np.ascontiguousarray(produce(name))
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name!r} is {x.shape} {x.dtype}, declared {shape} {dtype}")
            f.write(x.tobytes())  # little-endian hosts only (x86, ARM, TPU VMs)
    os.replace(tmp, path)
