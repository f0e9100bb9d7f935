"""The int8 prefill tiles on Intel AMX (csrc/gemm_q8_amx.c): for every format with 32-element
sub-blocks, in the file layout and the R16 layout, bit for bit what the AVX-512 VNNI tile loop gives
in a child process where PYENGINE_SIMD=avx512 hides AMX (groups of 16 tokens on AMX, the rest of a
batch on VNNI, row tails, both thread counts). Skipped where this process has no AMX; the tiles'
accuracy against float64 is tests/test_int8_activations.py's, on whichever loop runs."""
from __future__ import annotations

import numpy as np
import pytest
from pyengine import _cpu
from pyengine import _model as K
from simd_levels import at_level
from test_quants import SIZES, T
from test_r16 import blocks_of, repacked

AMX_TYPES = ["Q8_0", "Q4_0", "MXFP4", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]


def check_tiles(out: str) -> None:
    """Products of 16 and 53 tokens (three groups of 16 and a tail of 5) with 37 rows (a tail of 5),
    file layout and R16, 1 and 2 threads (the same bits), saved to `out`."""
    saved = {}
    for name in AMX_TYPES:
        qtype = T[name]
        n_in, n_out = (512 if SIZES[qtype][0] == 256 else 160), 37
        rng = np.random.default_rng(int(qtype))
        w = blocks_of(qtype, 2, n_out, n_in, rng)
        r = repacked(w, n_in, qtype)
        bias = rng.standard_normal(n_out).astype(np.float32)
        x = (rng.standard_normal((53, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)
        for n_tok in (16, 53):
            for layout, run in (("file", lambda th: K.matmul(w, int(qtype), n_in, x[:n_tok], bias, expert=1,
                                                              n_threads=th, int8_activations=True)),
                                ("r16", lambda th: K.matmul(r, int(qtype), n_in, x[:n_tok], bias, expert=1,
                                                             n_threads=th, r16_shape=(n_out, 2)))):
                got = run(2)
                assert np.array_equal(got, run(1)), (name, layout, n_tok)
                saved[f"{name}-{layout}-{n_tok}"] = got
    np.savez(out, **saved)


@pytest.mark.skipif(not _cpu.amx(), reason="no AMX-INT8 here, or PYENGINE_SIMD hides it")
def test_amx_tiles_bit_identical_to_vnni(tmp_path):
    at_level("avx512", "test_amx", f"check_tiles({str(tmp_path / 'vnni.npz')!r})", cwd=tmp_path)
    check_tiles(str(tmp_path / "amx.npz"))
    vnni, amx = np.load(tmp_path / "vnni.npz"), np.load(tmp_path / "amx.npz")
    assert sorted(vnni.files) == sorted(amx.files) and len(amx.files) == 4 * len(AMX_TYPES)
    for k in amx.files:
        assert np.array_equal(vnni[k], amx[k]), k
