"""Reading safetensors files without torch: the header is parsed and checked,
the data is memory-mapped, and each tensor comes back as a numpy view.

Format: 8 bytes little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the end of the header. bfloat16 has no
numpy dtype, so it is viewed as uint16 and tagged "bfloat16"; FP8 E4M3 (an FP8
checkpoint's weights, each with its weight_scale) is viewed as uint8 and tagged
"float8_e4m3". I32 and I64 tensors (an int4 checkpoint's packed codes, group indices and
shapes) are read by integers(), never as weights.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from .errors import ModelLoadError

# safetensors dtype -> (bytes per element, numpy view dtype or None, engine dtype name or None)
_DTYPES = {
    "F32": (4, np.float32, "float32"),
    "BF16": (2, np.uint16, "bfloat16"),
    "F16": (2, np.float16, "float16"),
    "F64": (8, None, None),
    "I64": (8, np.int64, None),
    "I32": (4, np.int32, None),
    "I16": (2, None, None),
    "I8": (1, None, None),
    "U8": (1, None, None),
    "BOOL": (1, None, None),
    "F8_E4M3": (1, np.uint8, "float8_e4m3"),
    "F8_E5M2": (1, None, None),
}
_MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from its header, data by mmap."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise ModelLoadError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(size - 8, _MAX_HEADER_BYTES):
                    raise ModelLoadError(
                        f"{self.path}: corrupt or truncated safetensors header "
                        f"(claims {header_len} bytes, file has {size})"
                    )
                header_bytes = f.read(header_len)
        except OSError as e:
            raise ModelLoadError(f"cannot read {self.path}: {e}") from e
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{self.path}: the safetensors header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise ModelLoadError(f"{self.path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, data_size)
        self._map = None

    def _check_entry(self, name, entry, data_size):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list or an object is no dtype name
            raise ModelLoadError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelLoadError(f"{where}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ModelLoadError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPES[dtype][0]:
            raise ModelLoadError(f"{where}: {end - begin} bytes do not hold {dtype}{shape}")
        if end > data_size:
            raise ModelLoadError(f"{where}: data ends at byte {end} but the file holds {data_size} (truncated?)")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> str:
        """The safetensors dtype, e.g. "BF16" or "F8_E4M3"."""
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def tensor(self, name: str) -> tuple[np.ndarray, str]:
        """The tensor as a read-only numpy view of the mapped file, and its engine dtype name."""
        dtype = self._entries[name][0]
        if _DTYPES[dtype][2] is None:
            raise ModelLoadError(
                f"{self.path}: tensor '{name}' has dtype {dtype}; float32, bfloat16, float16 or F8_E4M3 are supported"
            )
        return self._view(name), _DTYPES[dtype][2]

    def integers(self, name: str) -> np.ndarray:
        """An I32 or I64 tensor as a read-only numpy view of the mapped file."""
        dtype = self._entries[name][0]
        if dtype not in ("I32", "I64"):
            raise ModelLoadError(f"{self.path}: tensor '{name}' has dtype {dtype}; I32 or I64 expected")
        return self._view(name)

    def _view(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[self._data_start + begin : self._data_start + end].view(_DTYPES[dtype][1]).reshape(shape)
