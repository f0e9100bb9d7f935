"""The architecture registry: `general.architecture` spellings -> the handler that loads them.

One entry per model family, several spellings per entry: Ollama writes `gptoss`, llama.cpp writes
`gpt-oss`, both are the same network (llama.cpp's LLM_ARCH_OPENAI_MOE). Logs always name the
canonical spelling; hyperparameter keys are read under the file's own spelling."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyengine.errors import ModelLoadError
from pyengine.gguf_reader import RawTensor
from pyengine.hparams import GptOssHParams, read_hparams
from pyengine.layouts import expert_ff_width, normalise_tensors


@dataclass(frozen=True)
class Architecture:
    """How to load one model family: its names, hyperparameters and tensor layout."""

    canonical: str
    aliases: tuple[str, ...]
    llm_arch: str  # llama.cpp's enum name, for the log line
    read_hparams: Callable[[Mapping[str, Any], str, Mapping[str, RawTensor]], Any]
    normalise: Callable  # (raw tensors, tensor_bytes, hparams) -> (canonical tensors, problems)


def _gptoss_hparams(metadata: Mapping[str, Any], prefix: str, raw: Mapping[str, RawTensor]) -> GptOssHParams:
    return read_hparams(metadata, prefix, expert_ff_width(raw))


GPT_OSS = Architecture("gptoss", ("gpt-oss",), "LLM_ARCH_OPENAI_MOE", _gptoss_hparams, normalise_tensors)

REGISTRY: dict[str, Architecture] = {}
for _arch in (GPT_OSS,):
    for _name in (_arch.canonical, *_arch.aliases):
        REGISTRY[_name] = _arch


def supported_names() -> list[str]:
    """Every accepted `general.architecture` spelling."""
    return list(REGISTRY)


def lookup(name: Any) -> Architecture:
    """The handler for a `general.architecture` value; ModelLoadError when unknown."""
    if not isinstance(name, str):
        raise ModelLoadError(f"Key general.architecture must be a string, got {name!r}")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelLoadError(f"Unknown architecture: {name} (supported: {', '.join(supported_names())})") from None
