"""The CUDA backends a test can run on: the emulator always (the kernels' own source compiled for the
CPU, see csrc/cuda/compat.h), the real one where pyengine._cuda was built and a GPU is present."""

import importlib

import pytest


def _backends() -> list:
    out = [pytest.param(importlib.import_module("pyengine._cuda_emu"), id="emu")]
    try:
        real = importlib.import_module("pyengine._cuda")
    except ImportError:
        return out
    if real.device_count() > 0:
        out.append(pytest.param(real, id="cuda", marks=pytest.mark.cuda))
    return out


BACKENDS = _backends()
