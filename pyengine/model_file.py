"""Open a gpt-oss model: resolve its name, map its GGUF file(s), check it, and expose canonical tensors.

This is the loader's public door (docs/loader.md): `open_model(path_or_name)` returns a
`ModelFile` with the metadata, the hyperparameters (`GptOssHParams`) and the tensors under
llama.cpp's names whatever the file layout. No tensor data is read at open; split models
(NAME-00001-of-0000N.gguf) open as one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyengine.architectures import Architecture, lookup
from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import GGUFFile, RawTensor, type_name
from pyengine.hparams import GptOssHParams
from pyengine.log import logger
from pyengine.model_paths import SPLIT_RE, resolve_model
from pyengine.tensor import Tensor

__all__ = ["GptOssHParams", "ModelFile", "Tensor", "check_files", "open_gguf_files", "open_model"]


def _shard_paths(path: Path, count: int) -> list[Path]:
    m = SPLIT_RE.match(path.name)
    if m is None:
        raise ModelLoadError(f"{path.name} is shard of a {count}-file split model, but its name does not "
                             f"follow NAME-00001-of-{count:05d}.gguf, so the other shards cannot be found")
    if int(m["count"]) != count:
        raise ModelLoadError(f"{path.name} says split.count = {count}, but its name says {int(m['count'])}")
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _split_count(f: GGUFFile) -> int:
    count = f.metadata.get("split.count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 99999:
        raise ModelLoadError(f"{f.path.name}: split.count must be an integer from 1 to 99999, got {count!r}")
    return count


def open_gguf_files(path: Path) -> list[GGUFFile]:
    """Map a GGUF file, or every shard of a split model starting from any of its shards."""
    first = GGUFFile(path)
    count = _split_count(first)
    if count == 1:
        return [first]
    paths = _shard_paths(path, count)
    if path != paths[0]:
        first.close()
        first = GGUFFile(paths[0])
    files = [first]
    try:
        for i, p in enumerate(paths[1:], start=1):
            files.append(GGUFFile(p, file_index=i))
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def check_files(files: list[GGUFFile]) -> tuple[dict[str, RawTensor], list[str]]:
    """Merge the tensor directories of a model's files and list every directory or split problem."""
    problems = [p for f in files for p in f.problems]
    raw: dict[str, RawTensor] = {}
    for i, f in enumerate(files):
        if len(files) > 1:
            no, count = f.metadata.get("split.no"), f.metadata.get("split.count")
            if no != i or count != len(files):
                problems.append(f"{f.path.name}: split.no = {no!r}, split.count = {count!r}; expected "
                                f"{i} and {len(files)}")
        for name, t in f.tensors.items():
            if name in raw:
                problems.append(f"Duplicate tensor name: {name} (in {files[raw[name].file_index].path.name} "
                                f"and {f.path.name})")
            raw[name] = t
    if len(files) > 1:
        want = files[0].metadata.get("split.tensors.count")
        have = sum(len(f.tensors) for f in files)
        if want != have:
            problems.append(f"split.tensors.count is {want!r} but the {len(files)} shards hold {have} tensors")
    return raw, problems


def model_arch(metadata: Mapping[str, Any]) -> tuple[str, Architecture]:
    """The file's own architecture spelling and its registry entry."""
    if "general.architecture" not in metadata:
        raise ModelLoadError("Missing required key: general.architecture")
    name = metadata["general.architecture"]
    return name, lookup(name)


def type_problems(raw: Mapping[str, RawTensor]) -> list[str]:
    """Tensors in a type the engine's kernels cannot compute with (the GGUF reader knows more types)."""
    from pyengine.quants import type_info  # the compiled kernels' type table

    return [f"tensor {name} has type {type_name(t.ggml_type)}, which this engine does not support"
            for name, t in raw.items() if not t.openai_mxfp4 and type_info(t.ggml_type) is None]


def vocab_problems(metadata: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> list[str]:
    """The tokenizer's vocabulary must match the embedding rows (when both are present)."""
    embd = tensors.get("token_embd.weight")
    if embd is None or "tokenizer.ggml.tokens" not in metadata:
        return []
    n_tokens, n_rows = metadata.count("tokenizer.ggml.tokens"), embd.shape[-1]
    if n_tokens != n_rows:
        return [f"tokenizer.ggml.tokens has {n_tokens} entries but token_embd.weight has {n_rows} rows"]
    return []


class ModelFile:
    """An opened model: `path`, `name`, `arch`, `metadata`, `hparams`, `tensors` (canonical names),
    plus `files` (every shard's path), `raw_tensors` (the directory as stored) and `file_size`.
    Close it (or use it as a context manager) to release the mappings."""

    def __init__(self, files: list[GGUFFile], arch_name: str, architecture: Architecture,
                 hparams: GptOssHParams, tensors: dict[str, Tensor], raw: dict[str, RawTensor]):
        self._files = files
        self.path = files[0].path
        self.files = [f.path for f in files]
        self.metadata = files[0].metadata
        self.arch = arch_name
        self.architecture = architecture
        self.hparams = hparams
        self.tensors = tensors
        self.raw_tensors = raw
        self.file_size = sum(f.size for f in files)
        general_name = self.metadata.get("general.name")
        stem = SPLIT_RE.match(self.path.name)
        self.name = general_name if isinstance(general_name, str) and general_name else (
            stem["stem"] if stem else self.path.stem)

    def close(self) -> None:
        """Release the file mappings (tensor views keep theirs alive until dropped)."""
        for f in self._files:
            f.close()

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFile({str(self.path)!r}, arch={self.arch!r}, tensors={len(self.tensors)})"


def _raise_first(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `pyengine validate` to list them)" \
            if len(problems) > 1 else ""
        raise ModelLoadError(problems[0] + more)


def open_model(path_or_name: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> ModelFile:
    """Open a model file (or a model name in the models folder), check it and log the load.

    Raises ModelLoadError (a ValueError) with one clear sentence when the model cannot be used."""
    logger.info("Loading model: %s", os.fspath(path_or_name))
    path = resolve_model(path_or_name, models_dir)
    files = open_gguf_files(path)
    try:
        raw, problems = check_files(files)
        _raise_first(problems + type_problems(raw))
        metadata = files[0].metadata
        arch_name, arch = model_arch(metadata)
        logger.info("Architecture detected: %s (%s)", arch.canonical, arch.llm_arch)
        hparams = arch.read_hparams(metadata, arch_name, raw)
        tensors, problems = arch.normalise(raw, lambda t: files[t.file_index].tensor_bytes(t), hparams)
        _raise_first(problems + vocab_problems(metadata, tensors))
    except BaseException:
        for f in files:
            f.close()
        raise
    logger.info("Model loaded successfully")
    return ModelFile(files, arch_name, arch, hparams, tensors, raw)
