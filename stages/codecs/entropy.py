"""Entropy codecs applied to a whole run-length payload: zstd and lz4 (block format).

``decompress`` takes the exact output size (carried beside the payload),
checks it against the frame's declared size (zstd) or the format's limit
(lz4) before allocating, allocates no more than that, and raises CorruptData
unless the data decompresses to exactly that many bytes. Callers bound the
size first (``decode max-batch=``, the replica-sink's epoch budget).
"""
from __future__ import annotations

from typing import Any

import lz4.block
import numpy as np
import zstandard

from pipeline.errors import ConfigError, CorruptData

MAX_RAW_SIZE = 0x7E000000   # LZ4_MAX_INPUT_SIZE: the largest block lz4 can decompress to (about 2 GiB)


def _as_bytes_view(data: np.ndarray, name: str) -> memoryview:
    array = np.ascontiguousarray(data)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise TypeError(f"{name}: expected a 1-D uint8 array, got {array.dtype} {array.shape}")
    return array.data


def _check_raw_size(raw_size: int, name: str) -> int:
    if isinstance(raw_size, bool) or not isinstance(raw_size, (int, np.integer)) or raw_size < 0:
        raise CorruptData(f"{name}: raw size {raw_size!r} is not a byte count")
    return int(raw_size)


class EntropyCodec:
    """Base of the entropy codecs: ``compress`` / ``decompress`` whole payloads."""

    name = ""

    def get_config(self) -> dict[str, Any]:
        return {"id": self.name}

    def compress(self, data: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decompress(self, data: np.ndarray, raw_size: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "id")
        return f"{type(self).__name__}({options})"


class ZstdCodec(EntropyCodec):
    """One zstd frame with its content size in the header; ``level`` 1..22 (default 1)."""

    name = "zstd"

    def __init__(self, level: int = 1):
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise ConfigError(f"zstd: level must be an integer from 1 to 22, got {level!r}")
        self.level = level
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def get_config(self) -> dict[str, Any]:
        return {"id": self.name, "level": self.level}

    def compress(self, data: np.ndarray) -> np.ndarray:
        return np.frombuffer(self._compressor.compress(_as_bytes_view(data, "zstd input")), dtype=np.uint8)

    def decompress(self, data: np.ndarray, raw_size: int) -> np.ndarray:
        raw_size = _check_raw_size(raw_size, "zstd")
        view = _as_bytes_view(data, "zstd input")
        try:
            declared = zstandard.frame_content_size(view)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"zstd: not a zstd frame ({exc})") from None
        if declared != raw_size:
            raise CorruptData(f"zstd: frame declares {declared} bytes, expected {raw_size}")
        try:
            raw = self._decompressor.decompress(view, max_output_size=raw_size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"zstd: corrupt frame ({exc})") from None
        except (OverflowError, MemoryError) as exc:
            raise CorruptData(f"zstd: cannot decompress {raw_size} bytes ({exc.__class__.__name__})") from None
        if len(raw) != raw_size:
            raise CorruptData(f"zstd: decompressed to {len(raw)} bytes, expected {raw_size}")
        return np.frombuffer(raw, dtype=np.uint8)


class Lz4Codec(EntropyCodec):
    """One LZ4 block without a size prefix (the size travels beside it)."""

    name = "lz4"

    def compress(self, data: np.ndarray) -> np.ndarray:
        return np.frombuffer(lz4.block.compress(_as_bytes_view(data, "lz4 input"), store_size=False),
                             dtype=np.uint8)

    def decompress(self, data: np.ndarray, raw_size: int) -> np.ndarray:
        raw_size = _check_raw_size(raw_size, "lz4")
        view = _as_bytes_view(data, "lz4 input")
        if raw_size > MAX_RAW_SIZE:
            raise CorruptData(f"lz4: raw size {raw_size} exceeds the {MAX_RAW_SIZE} bytes one block may hold")
        try:
            raw = lz4.block.decompress(view, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptData(f"lz4: corrupt block ({exc})") from None
        except (OverflowError, MemoryError) as exc:     # a size the library or the machine cannot hold
            raise CorruptData(f"lz4: cannot decompress {raw_size} bytes ({exc.__class__.__name__})") from None
        if len(raw) != raw_size:
            raise CorruptData(f"lz4: decompressed to {len(raw)} bytes, expected {raw_size}")
        return np.frombuffer(raw, dtype=np.uint8)
