"""Fixtures shared by the CUDA test files."""

import pytest

from cuda_backends import BACKENDS


@pytest.fixture(params=BACKENDS)  # the pytest.param objects: the real backend keeps its cuda mark (-m cuda)
def gpu(request, monkeypatch):
    """The backend that device="cuda" loads: the emulator, or the real one where a GPU is present."""
    if request.param.BACKEND == "emulator":
        monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    else:
        monkeypatch.delenv("PYENGINE_CUDA_EMULATOR", raising=False)
    return request.param
