"""The GGUF container read directly: its metadata and the byte range of each tensor, over one memory map.

The `gguf` package's own `GGUFReader` builds a numpy view for every string of the file; a 49,152-token vocabulary
with its merges then takes ~10 s to open (measured here on SmolLM2-135M's file), which alone would exceed the
8 s time-to-first-token budget of `sample.py --chat`. This reader walks the same layout (GGUF v2 / v3: header,
key-value metadata, tensor infos, aligned data) in well under a second; the `gguf` package still supplies the tensor
types, their block sizes and the dequantisation.
"""
from __future__ import annotations

import dataclasses
import struct

import numpy as np

from transformer.config import ConfigError

# value type -> struct format (scalars); 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first): GGUF lists dims fastest first
    type_id: int
    data: np.ndarray  # the raw bytes, one row per innermost row of the tensor


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


class _Cursor:
    """Reads the header from a bytes prefix of the file (parsing it out of the memory map costs a numpy view per
    field, seconds for a large vocabulary)."""

    def __init__(self, head: bytes):
        self.head, self.pos = head, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.head):
            raise _NeedMore
        out = self.head[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.head):
            raise _NeedMore
        value = struct.unpack_from(fmt, self.head, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item == 8:
                return [self.string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown GGUF metadata value type {kind}")


def _parse_header(head: bytes, path: str):
    c = _Cursor(head)
    if c.take(4) != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    version = c.scalar("<I")
    if version not in (2, 3):
        raise ConfigError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    meta = {}
    try:
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.scalar("<I"))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), c.scalar("<I"), c.scalar("<Q")))
    return meta, infos, c.pos


def read_gguf(path: str) -> tuple[dict, list[TensorInfo]]:
    """(metadata, tensors) of a GGUF file; a truncated or foreign file is a ConfigError."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e})") from None
    size = 1 << 22
    while True:
        with open(path, "rb") as f:
            head = f.read(size)
        try:
            meta, infos, end = _parse_header(head, path)
            break
        except _NeedMore:
            if len(head) < size:  # the whole file was read and the header still runs past it
                raise ConfigError(f"{path} is truncated (its header runs past the end of the file)") from None
            size *= 4
    align = int(meta.get("general.alignment", 32))
    start = -(-end // align) * align
    tensors = []
    for name, shape, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ConfigError(f"{path}: tensor {name} has unknown GGML type {type_id}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        row = shape[-1] if shape else 1
        if row % block:
            raise ConfigError(f"{path}: tensor {name} rows of {row} are not whole {qtype.name} blocks")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = row // block * size
        lo = start + offset
        if lo + rows * row_bytes > len(buf):
            raise ConfigError(f"{path} is truncated: tensor {name} runs past the end of the file")
        tensors.append(TensorInfo(name, shape, type_id, buf[lo:lo + rows * row_bytes].reshape(rows, row_bytes)))
    return meta, tensors
