"""Is a file a whole GGUF file? A walk of its header, every length checked against the file's size (Part 10).

``gguf.GGUFReader`` trusts the counts and lengths a header states: a damaged one sends it reading
past the end of the file (numpy errors from deep inside), or looping over an array said to hold
2**60 items. ``check_gguf_file`` reads the same fields first (magic, version, counts, every metadata
value's length, every tensor's shape, type and offset) and raises ``GGUFError`` naming the file and
the first field that cannot be what it claims, or the first tensor whose bytes lie past the end.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import gguf
import numpy as np

from helpers.weight_files import WeightsError

__all__ = ["GGUFError", "check_gguf_file"]


class GGUFError(WeightsError):
    """A GGUF file could not be read or holds what ``ModernModel`` cannot run; the message names it."""


_MAGIC = b"GGUF"
_VALUE = gguf.GGUFValueType
_SCALAR_BYTES = {_VALUE.UINT8: 1, _VALUE.INT8: 1, _VALUE.UINT16: 2, _VALUE.INT16: 2, _VALUE.UINT32: 4, _VALUE.INT32: 4,
                 _VALUE.FLOAT32: 4, _VALUE.BOOL: 1, _VALUE.UINT64: 8, _VALUE.INT64: 8, _VALUE.FLOAT64: 8}
_MAX_DIMS = 4  # ggml's tensors have at most four dimensions


class _Cursor:
    """Reads the header's little-endian fields in order, refusing any that would run past the file's end."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.path, self.at = data, path, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.at:
            raise GGUFError(f"{self.path} is truncated or damaged: {what} at byte {self.at:,} needs {n:,} bytes, "
                            f"but the file has {len(self.data):,}; download or copy it again")

    def take(self, n: int, what: str) -> int:
        self.need(n, what)
        start, self.at = self.at, self.at + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        length = self.u64(f"the length of {what}")
        start = self.take(length, what)
        return bytes(self.data[start:start + length])

    def value(self, kind: int, key: str) -> int | None:
        """Step over the value of metadata ``key``; return it if it is a UINT32 (``general.alignment`` is one)."""
        if kind in _SCALAR_BYTES:
            start = self.take(_SCALAR_BYTES[kind], f"the value of {key}")
            return struct.unpack_from("<I", self.data, start)[0] if kind == _VALUE.UINT32 else None
        if kind == _VALUE.STRING:
            self.string(f"the value of {key}")
            return None
        if kind != _VALUE.ARRAY:
            raise GGUFError(f"{self.path}: metadata {key} has value type {kind}, which GGUF does not define; the file "
                            "is damaged or newer than the gguf package")
        item, count = self.u32(f"the item type of {key}"), self.u64(f"the length of {key}")
        if item in _SCALAR_BYTES:
            self.take(count * _SCALAR_BYTES[item], f"the {count:,} items of {key}")
        elif item == _VALUE.STRING:
            self.need(count * 8, f"the {count:,} strings of {key}")  # each at least its 8-byte length
            for index in range(count):
                self.string(f"item {index} of {key}")
        else:
            raise GGUFError(f"{self.path}: metadata {key} is an array of type {item}, which load_gguf does not read")
        return None


def check_gguf_file(path: str | os.PathLike) -> None:
    """Walk the header (magic, counts, metadata, tensor infos) and check every tensor's bytes lie in the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise GGUFError(f"{path} is empty, not a GGUF file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk(_Cursor(data, path))
    except OSError as error:
        raise GGUFError(f"{path} cannot be read ({error})") from error


def _walk(cursor: _Cursor) -> None:
    data, path = cursor.data, cursor.path
    cursor.take(4, "the magic number")
    if bytes(data[:4]) != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {bytes(data[:4])!r}, not {_MAGIC!r})")
    version = cursor.u32("the version")
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version} (or big-endian); load_gguf reads little-endian "
                        "versions 2 and 3")
    n_tensors, n_keys = cursor.u64("the tensor count"), cursor.u64("the metadata count")
    if n_tensors * 24 + n_keys * 12 > len(data):
        raise GGUFError(f"{path} is damaged: its header claims {n_tensors:,} tensors and {n_keys:,} metadata "
                        f"entries, more than {len(data):,} bytes can hold")
    alignment = 32  # GGUF's default
    for number in range(n_keys):
        key = cursor.string(f"metadata key {number}").decode("utf-8", errors="replace")
        value = cursor.value(cursor.u32(f"the type of {key}"), key)
        if key == "general.alignment" and value:
            alignment = value
    infos = []
    for number in range(n_tensors):
        name = cursor.string(f"the name of tensor {number}").decode("utf-8", errors="replace")
        n_dims = cursor.u32(f"the dimension count of {name}")
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"{path} is damaged: tensor {name} claims {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [cursor.u64(f"the shape of {name}") for _ in range(n_dims)]
        kind, offset = cursor.u32(f"the type of {name}"), cursor.u64(f"the offset of {name}")
        infos.append((name, dims, kind, offset))
    start = -(-cursor.at // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    for name, dims, kind, offset in infos:
        try:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name} has type number {kind}, which the gguf package does not know; "
                            "the file is damaged or newer than gguf==0.19.0") from None
        begin, end = start + offset, start + offset + int(np.prod(dims, dtype=object)) // block * block_bytes
        if end > len(data):
            raise GGUFError(f"{path} is truncated: tensor {name} needs bytes {begin:,}..{end:,} but the file has "
                            f"{len(data):,}; download or copy it again")
