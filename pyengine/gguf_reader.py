"""Fast, zero-copy GGUF parsing: header, key/value metadata and the tensor directory.

gguf.GGUFReader builds a numpy object per field and per string, which takes ~12 s and ~1 GB for a
gpt-oss vocabulary (201,088 tokens, 446,189 merges). Here the file is memory-mapped, small values
are unpacked with `struct`, numeric arrays are numpy views, and string arrays are only *located*
at open (a compiled walk over their length prefixes, pyengine._gguf) and decoded on first access.
Tensor data is never read at open: each tensor is a uint8 view of the mapping.

Every malformed input raises ModelLoadError with one sentence naming what is wrong; problems in the
tensor directory that do not stop parsing (bounds, alignment, duplicates, unknown types) are
collected in `GGUFFile.problems` so that `pyengine validate` can list them all."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from pyengine._gguf import decode_strings, scan_strings
from pyengine.errors import ModelLoadError

DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
# Arrays with more elements than this are decoded on first access instead of at open.
LAZY_ARRAY_MIN = 1024
MAX_ARRAY_NESTING = 8
# ggml retired type id 4 (Q4_2); Ollama's first gpt-oss files reused it for MXFP4 in OpenAI's
# nibble order, 17-byte blocks of 32 (see layouts.py, which repacks it to type 39).
OPENAI_MXFP4_TYPE = 4

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_KNOWN_TYPES = frozenset(int(t) for t in GGML_QUANT_SIZES)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def type_name(ggml_type: int) -> str:
    """The ggml name of a type id ("Q8_0", "MXFP4"), or "type N" when unknown."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this ggml type and ne-shape occupies; ValueError if that is impossible."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if shape[0] % block:
        raise ValueError(f"its row of {shape[0]} elements is not a multiple of the {type_name(ggml_type)} "
                         f"block size {block}")
    n = 1
    for d in shape:
        n *= d
    return n // block * size


@dataclass(frozen=True)
class LazyArray:
    """A metadata array found in the file but not decoded yet (see Metadata)."""

    value_type: GGUFValueType
    count: int
    offset: int
    offsets: np.ndarray | None  # string arrays: scan_strings' result


@dataclass(frozen=True)
class RawTensor:
    """One tensor directory entry as stored in the file (names and types untouched)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]   # GGUF ne order, fastest first
    offset: int              # absolute byte offset in its file
    nbytes: int
    file_index: int = 0      # which shard of a split model holds it
    openai_mxfp4: bool = False  # type 4 holding OpenAI-order MXFP4 blocks (17 bytes per 32)


class Metadata(Mapping):
    """Every key/value pair of a GGUF file; big arrays are decoded on first access and cached.

    String arrays become lists of str, `tokenizer.ggml.token_type` a numpy int32 array, other
    arrays lists of Python numbers. `count(key)` gives an array's length without decoding it."""

    def __init__(self, buf: memoryview, values: dict[str, Any], types: dict[str, GGUFValueType]):
        self._buf = buf
        self._values = values
        self.types = types  # key -> GGUFValueType of the value (ARRAY for arrays)

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, LazyArray):
            value = self._decode(key, value)
            self._values[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._values  # Mapping's default would decode the value to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def count(self, key: str) -> int:
        """Number of elements of an array value (decoded or not); 1 for a scalar."""
        value = self._values[key]
        if isinstance(value, LazyArray):
            return value.count
        return len(value) if isinstance(value, (list, np.ndarray)) else 1

    def _decode(self, key: str, lazy: LazyArray) -> Any:
        return decode_array(self._buf, key, lazy)


def decode_array(buf: memoryview, key: str, lazy: LazyArray) -> Any:
    """The Python value of a located array (see Metadata for the types)."""
    if lazy.value_type == GGUFValueType.STRING:
        return decode_strings(buf, lazy.offsets)
    arr = np.frombuffer(buf, dtype=_NUMPY_DTYPES[lazy.value_type], count=lazy.count, offset=lazy.offset)
    if key == "tokenizer.ggml.token_type":
        return arr.astype(np.int32)
    return arr.tolist()


class _Cursor:
    """Reads little-endian values from the mapping, raising ModelLoadError past its end."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path.name} is truncated: {what} at byte {self.pos} runs past "
                                 f"the end of the file ({len(self.buf)} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, strict: bool = True) -> str:
        """A length-prefixed UTF-8 string; names must be valid UTF-8, values get U+FFFD for bad bytes."""
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8", "strict" if strict else "replace")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self.path.name}: {what} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelLoadError(f"{self.path.name}: {what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, key: str, lazy_ok: bool = True) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"the string value of {key}", strict=False)
        if vtype == GGUFValueType.ARRAY:
            return self.array(key, lazy_ok)
        fmt = _SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        self.need(size, f"the value of {key}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def array(self, key: str, lazy_ok: bool, depth: int = 0) -> Any:
        etype = self.value_type(f"the element type of {key}")
        count = self.u64(f"the length of {key}")
        if etype == GGUFValueType.STRING:
            if count > (len(self.buf) - self.pos) // 8:
                raise ModelLoadError(f"{self.path.name} is truncated: {key} claims {count} strings, "
                                     f"more than the rest of the file can hold")
            try:
                offsets = scan_strings(self.buf, self.pos, count)
            except ValueError as e:
                raise ModelLoadError(f"{self.path.name} is truncated: in {key}, {e}") from None
            start, self.pos = self.pos, int(offsets[-1])
            lazy = LazyArray(etype, count, start, offsets)
            return lazy if lazy_ok and count > LAZY_ARRAY_MIN else decode_array(self.buf, key, lazy)
        if etype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise ModelLoadError(f"{self.path.name}: {key} nests arrays more than {MAX_ARRAY_NESTING} deep")
            return [self.array(key, False, depth + 1) for _ in range(self.bounded(count, 12, key))]
        itemsize = np.dtype(_NUMPY_DTYPES[etype]).itemsize
        self.need(count * itemsize, f"the array {key}")
        lazy = LazyArray(etype, count, self.pos, None)
        self.pos += count * itemsize
        return lazy if lazy_ok and count > LAZY_ARRAY_MIN else decode_array(self.buf, key, lazy)

    def bounded(self, count: int, min_item: int, what: str) -> int:
        if count > (len(self.buf) - self.pos) // min_item:
            raise ModelLoadError(f"{self.path.name} is truncated: {what} claims {count} entries, "
                                 f"more than the rest of the file can hold")
        return count


def advise_huge_pages(m: mmap.mmap) -> None:
    """Ask for 2 MiB pages on the weight mapping (MADV_HUGEPAGE): the page cache then reads what a
    fault touches as 2 MiB folios, mapped one page-table entry each instead of 512, so a decoded
    token's ~2.6 GB of weights takes ~1.3k TLB entries instead of ~630k (measured in
    docs/forward.md, "Weight mapping"). Costs nothing at load; a kernel without it is ignored."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass


class GGUFFile:
    """One parsed GGUF file: `version`, `metadata`, `tensors` (name -> RawTensor, file order),
    `alignment`, `data_offset`, `size` and `problems` (directory defects; empty when sound)."""

    def __init__(self, path: str | os.PathLike, file_index: int = 0):
        self.path = Path(path)
        self.file_index = file_index
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:
                    raise ModelLoadError(f"{self.path.name} is not a GGUF file: only {self.size} bytes")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelLoadError(f"Cannot open model file {self.path}: {e.strerror or e}") from None
        advise_huge_pages(self._mmap)
        self.buf = memoryview(self._mmap)
        self.problems: list[str] = []
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self.buf, self.path)
        magic = cur.u32("the magic number")
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path.name} is not a GGUF file: bad magic {magic:#010x}")
        self.version = cur.u32("the version")
        if int.from_bytes(self.version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{self.path.name} is a big-endian GGUF file, which is not supported")
        if self.version not in SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{self.path.name}: unsupported GGUF version {self.version} "
                                 f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        n_tensors = cur.bounded(cur.u64("the tensor count"), 8 + 4 + 4 + 8, "the tensor directory")
        n_kv = cur.bounded(cur.u64("the key/value count"), 8 + 4 + 1, "the metadata")
        values: dict[str, Any] = {}
        types: dict[str, GGUFValueType] = {}
        for i in range(n_kv):
            key = cur.string(f"the name of metadata key {i}")
            vtype = cur.value_type(f"the type of {key}")
            if key in values:
                self.problems.append(f"Duplicate metadata key: {key}")
            values[key] = cur.value(vtype, key)
            types[key] = vtype
        self.metadata = Metadata(self.buf, values, types)
        self.alignment = self._alignment()
        entries = []
        for i in range(n_tensors):
            name = cur.string(f"the name of tensor {i}")
            n_dims = cur.u32(f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= 4:
                raise ModelLoadError(f"{self.path.name}: tensor {name} has {n_dims} dimensions "
                                     f"(expected 1 to 4)")
            shape = tuple(cur.u64(f"the shape of tensor {name}") for _ in range(n_dims))
            ggml_type = cur.u32(f"the type of tensor {name}")
            offset = cur.u64(f"the data offset of tensor {name}")
            entries.append((name, shape, ggml_type, offset))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        if self.data_offset > self.size:
            raise ModelLoadError(f"{self.path.name} is truncated: the tensor data section starts at byte "
                                 f"{self.data_offset}, past the end of the file ({self.size} bytes)")
        self.tensors = self._directory(entries)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        align = self.metadata["general.alignment"]
        if self.metadata.types["general.alignment"] != GGUFValueType.UINT32 or align <= 0 or align & (align - 1):
            raise ModelLoadError(f"{self.path.name}: general.alignment must be a power-of-two u32, "
                                 f"got {align!r}")
        return align

    def _directory(self, entries: list[tuple[str, tuple[int, ...], int, int]]) -> dict[str, RawTensor]:
        data_size = self.size - self.data_offset
        tensors: dict[str, RawTensor] = {}
        past_end: list[tuple[int, str]] = []
        for name, shape, ggml_type, offset in entries:
            where = f"tensor {name}"
            if name in tensors:
                self.problems.append(f"Duplicate tensor name: {name}")
                continue
            if any(d == 0 for d in shape) or any(d >= 1 << 40 for d in shape):
                self.problems.append(f"{where} has an impossible shape {list(shape)}")
                continue
            openai_mxfp4 = ggml_type == OPENAI_MXFP4_TYPE
            size_type = int(GGMLQuantizationType.MXFP4) if openai_mxfp4 else ggml_type
            if size_type not in _KNOWN_TYPES:
                self.problems.append(f"{where} has unknown ggml type id {ggml_type}")
                continue
            try:
                nbytes = tensor_nbytes(size_type, shape)
            except ValueError as e:
                self.problems.append(f"{where}: {e}")
                continue
            if offset % self.alignment:
                self.problems.append(f"{where} data offset {offset} is not a multiple of the alignment "
                                     f"{self.alignment}")
                continue
            if offset + nbytes > data_size:
                past_end.append((self.data_offset + offset + nbytes, name))
                continue
            tensors[name] = RawTensor(name, ggml_type, shape, self.data_offset + offset, nbytes,
                                      self.file_index, openai_mxfp4)
        if past_end:
            need, name = max(past_end)
            self.problems.append(f"{self.path.name} is truncated: {len(past_end)} tensor(s) run past the end "
                                 f"of the file (the data needs at least {need} bytes, the file has {self.size}; "
                                 f"e.g. tensor {past_end[0][1]})")
        self._check_overlaps(tensors)
        return tensors

    def _check_overlaps(self, tensors: dict[str, RawTensor]) -> None:
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end_a, a), (start_b, _, b) in pairwise(spans):
            if start_b < end_a:
                self.problems.append(f"tensor {b} overlaps the data of tensor {a}")

    def tensor_bytes(self, t: RawTensor) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view of the mapping (no copy)."""
        return np.frombuffer(self.buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def close(self) -> None:
        """Release the mapping (left to the garbage collector while tensor views are alive)."""
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:
            pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
