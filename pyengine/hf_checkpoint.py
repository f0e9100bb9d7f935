"""Read a Hugging Face checkpoint folder (config.json + *.safetensors) without torch.

The converter needs tensors one at a time, memory-mapped, including bf16 ones (which the
`safetensors` numpy front end cannot return) and uint8 MXFP4 blocks. The safetensors format is an
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
little-endian data; this module maps it with numpy and widens bf16 to float32 by a 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from pyengine.errors import ModelLoadError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8,
           "I8": np.int8, "I32": np.int32, "I64": np.int64, "F64": np.float64}


class HFCheckpoint:
    """The tensors and config of one HF model folder; tensors are read lazily from memory maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{self.folder}: no config.json (not a Hugging Face model folder)")
        try:
            self.config: dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{cfg_path}: cannot read config: {e}") from None
        self._index: dict[str, tuple[Path, dict]] = {}
        self._data_start: dict[Path, int] = {}
        self._maps: dict[Path, np.memmap] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder}: no *.safetensors files")
        for f in files:
            self._read_header(f)

    def _read_header(self, path: Path) -> None:
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelLoadError(f"{path}: not a safetensors file: {e}") from None
        self._data_start[path] = 8 + n
        size = path.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in _DTYPES or 8 + n + end > size or begin > end:
                raise ModelLoadError(f"{path}: tensor {name}: bad dtype or offsets")
            self._index[name] = (path, info)

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. "BF16", "F32", "U8"."""
        return self._index[name][1]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][1]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (bf16 as uint16 bit patterns), a read-only memory-mapped view."""
        if name not in self._index:
            raise ModelLoadError(f"{self.folder}: tensor {name} is missing")
        path, info = self._index[name]
        mm = self._maps.get(path)
        if mm is None:
            mm = self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        start = self._data_start[path]
        dt = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        return mm[start + begin:start + end].view(dt).reshape(info["shape"])

    def float32(self, name: str) -> np.ndarray:
        """The tensor widened to float32 (bf16 exactly, by putting its bits in the high half)."""
        a = self.raw(name)
        if self.dtype(name) == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def close(self) -> None:
        self._maps.clear()
