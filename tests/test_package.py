"""The package builds, imports without any GPU library, and dispatches to a real SIMD level."""

import subprocess
import sys

import pyengine


def test_version():
    assert pyengine.__version__.count(".") == 2


def test_simd_level_is_detected_and_cappable(tmp_path):
    assert pyengine.simd_level() in ("avx512", "avx2", "scalar")
    out = subprocess.run(
        [sys.executable, "-c", "import pyengine; print(pyengine.simd_level())"],
        env={"PYENGINE_SIMD": "scalar", "PATH": ""}, cwd=tmp_path, capture_output=True, text=True,
        check=True)
    assert out.stdout.strip() == "scalar"


def test_cli_version(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyengine.cli", "--version"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pyengine {pyengine.__version__}"
