"""Where device="cuda" finds its backend, and one GPU copy of a model's weights per ModelFile.

pyengine._cuda exists only when nvcc was found at install time and needs a GPU at run time; the
emulator build pyengine._cuda_emu (the same kernel sources run on the CPU, see csrc/cuda/compat.h)
takes its place when PYENGINE_CUDA_EMULATOR=1, which is how tests and CI run the GPU code path
without a GPU. Nothing here is imported by the CPU engine."""

from __future__ import annotations

import importlib
import os
import weakref
from types import ModuleType
from typing import Any

from pyengine.errors import DeviceError

EMULATOR_ENV = "PYENGINE_CUDA_EMULATOR"

_models: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def backend() -> ModuleType:
    """The CUDA backend module, or a DeviceError that says why there is none."""
    if os.environ.get(EMULATOR_ENV) == "1":
        return importlib.import_module("pyengine._cuda_emu")
    try:
        mod = importlib.import_module("pyengine._cuda")
    except ImportError as e:
        raise DeviceError("device='cuda': this pyengine was built without its CUDA backend (nvcc was not "
                           "found at install time, or PYENGINE_CUDA=OFF); reinstall on a machine with the CUDA toolkit "
                           "(PYENGINE_CUDA=ON makes a missing nvcc an install error)") from e
    if mod.device_count() == 0:
        raise DeviceError("device='cuda': no CUDA device is visible (no NVIDIA driver, or "
                           "CUDA_VISIBLE_DEVICES hides them all)")
    return mod


def parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) from "cpu", "cuda" or "cuda:N"."""
    name, _, index = str(device).partition(":")
    if name == "cpu" and not index:
        return "cpu", 0
    if name == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")


def shared_model(model_file: Any, cpu_model: Any, hparams: Any, n_gpu_layers: int, cpu_moe: bool,
                 max_tok: int, graphs: bool, device_index: int) -> Any:
    """The CudaModel of model_file with these options, uploaded once: engines that share a ModelFile
    (the node's slots) share its weights on the GPU too."""
    cu = backend()
    if device_index >= cu.device_count():
        raise DeviceError(f"cuda:{device_index}: only {cu.device_count()} CUDA device(s) visible")
    key = (n_gpu_layers, bool(cpu_moe), bool(graphs), device_index, cu.BACKEND, bool(cpu_model.int8_activations))
    per_file = _models.setdefault(model_file, {})
    model = per_file.get(key)
    if model is None:
        model = cu.CudaModel(cpu_model, hparams, n_gpu_layers, cpu_moe, max_tok, graphs, device_index)
        per_file[key] = model
    return model
