"""Opening a GGUF in llama-cpp-python, the project's reference and speed peer (tests, bench/).

Why one place: on Intel CPUs with AMX, the llama-cpp-python 0.3.36 that pip builds natively
crashes (SIGSEGV) evaluating any file with Q8_0 weights when llama.cpp's CPU "extra buffer types"
are on, llama.cpp's own files included: the Q8_0 weights go to ggml's AMX buffer type, whose
tile configuration GCC 12 compiles without its tile shapes (bench/RESULTS.md), and a build without
AMX (bench/compare_llamacpp.py says how) runs the same files repacked. The tests must run
with whichever build is installed, so they use the plain buffers. The high-level API offers no
switch for them, so they are turned off through its model-params default, restored once the model
is loaded."""

from __future__ import annotations

import os
from typing import Any


def open_llama(path: str | os.PathLike, *, extra_bufts: bool = False, **kwargs: Any):
    """llama_cpp.Llama(model_path=path, **kwargs), with the extra buffer types off unless asked."""
    import llama_cpp
    import llama_cpp.llama as high_level

    if extra_bufts:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    high_level.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        high_level.llama_cpp.llama_model_default_params = default
