"""Running a test module's check functions with the C kernels capped at a lower SIMD level.

The kernels pick their variant once per process (PYENGINE_SIMD caps it), so each level needs a fresh
interpreter: `at_level(level, "test_x", "check_a()", "check_b(1)", tmp_path)` imports tests/test_x.py
there, runs the calls, and fails the test with the child's stderr if any raises. Levels this CPU does
not have are skipped. "avx512vnni" is the avx512 level with VBMI and BITALG hidden (Cascade Lake's
dispatch: AVX2's kernels for the 4-bit and 5-bit 32-blocks, vpshufb R16)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pyengine

ORDER = ["scalar", "avx2", "avx512vnni", "avx512"]
LOWER = ["scalar", "avx2"]


def in_child(module: str, *calls: str, env: dict[str, str], cwd: Path, setup: str = "", timeout: int = 300) -> None:
    """The calls of tests/`module`.py in a fresh interpreter with environment `env`, after `setup`
    (statements, each ending in "; ", that assert the child sees what the caller set up); fails the
    test with the child's stderr if any of it raises."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); {setup}import {module} as t; "
            + "; ".join(f"t.{c}" for c in calls) + "; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def at_level(level: str, module: str, *calls: str, cwd: Path, timeout: int = 300) -> None:
    if ORDER.index(pyengine.simd_level()) < ORDER.index(level):
        pytest.skip(f"this CPU has no {level}")
    seen = "avx512" if level == "avx512vnni" else level
    hidden = "from pyengine._cpu import avx512_extensions as x; assert x() == (), x(); " if level == "avx512vnni" else ""
    in_child(module, *calls, env={"PYENGINE_SIMD": level, "PATH": ""}, cwd=cwd, timeout=timeout,
             setup=f"import pyengine; assert pyengine.simd_level() == {seen!r}, pyengine.simd_level(); {hidden}")
