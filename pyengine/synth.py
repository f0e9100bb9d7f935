"""Random-weight gpt-oss GGUFs at the real shapes (gpt-oss-20b, gpt-oss-120b), for benchmarking.

Why: speed depends on shapes and weight types, not on what the weights say, so a file with the
real dimensions, the real quantization layout (MXFP4 experts, Q8_0 attention, embeddings and
output, F32 norms/biases/router: ggml-org's files) and the real o200k_harmony vocabulary times
exactly like the real model, without a 12 GB download. Experts are random MXFP4 codes with E8M0
scales chosen so activations stay finite; the rest comes from demo_model's RandomWeights. Written
by the converter's writer, like demo-model; `--layers` cuts the depth for quicker runs.

`mix="q4_k_m"` (`--mix q4_k_m`) writes the type layout of the "Q4_K_M" gpt-oss files people run
instead (Q4_K attn_output, Q5_0 / Q8_0 other matrices, the same MXFP4 experts: see MIXES), and
`mix="q5_k_m"` that of the "Q5_K_M" files (Q5_K attn_output, Q5_1 / Q8_0 other matrices); their
K-quant matrices are drawn as finished blocks (random codes, scales that give the same spread),
since gguf.quants cannot quantize K-quants. `mix="f16"` writes the "F16" files' layout: F16 attention,
embeddings and output around the same MXFP4 experts.

`fast=True` (`pyengine synth --fast`) writes the same shapes and types in seconds rather than
minutes, for a device check that cannot wait: layer 0's tensors are drawn once and repeated in
every layer, every quantized matrix is drawn as finished blocks instead of quantized from floats,
and the vocabulary is a synthetic byte-level BPE one
of the same size (byte tokens, then byte pairs and triples with their merges, then the harmony
special tokens), so no o200k source package is needed. The `tiny` shape is a toy size (64 wide,
2 layers, 8 experts) for testing such scripts; with --fast its vocabulary has 533 tokens (256 merges:
llama.cpp refuses a BPE vocabulary without merges)."""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from pyengine import o200k
from pyengine.convert import GptOssConfig, PlannedTensor, ProgressFn, write_gguf
from pyengine.demo_model import RandomWeights, chat_template
from pyengine.hf_tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, GGUFTokenizer

# gpt-oss-20b / 120b (docs/gpt-oss.md) share everything but depth and expert count; tiny is a toy
# size. The fast mode's synthetic vocabulary: n_normal normal tokens, then the first n_special of
# o200k_harmony's special ids (all 1,090, or tiny's 21: the named ones up to <|endofprompt|>).
_REAL = {"n_embd": 2880, "n_head": 64, "n_normal": o200k.N_BASE, "n_special": o200k.N_VOCAB - o200k.N_BASE}
SHAPES = {"gpt-oss-20b": {**_REAL, "n_layer": 24, "n_expert": 32},
          "gpt-oss-120b": {**_REAL, "n_layer": 36, "n_expert": 128},
          "tiny": {"n_embd": 64, "n_head": 8, "n_normal": 512, "n_special": 21, "n_layer": 2, "n_expert": 8}}


def shape_config(shape: str, n_layer: int | None = None, fast: bool = False) -> GptOssConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[shape]
    layers = s["n_layer"] if n_layer is None else n_layer
    if layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    return GptOssConfig(
        n_ctx_train=131072, n_embd=s["n_embd"], n_layer=layers, n_ff=s["n_embd"], n_head=s["n_head"],
        n_head_kv=s["n_head"] // 8, head_dim=64, n_expert=s["n_expert"], n_expert_used=4, rms_eps=1e-5,
        sliding_window=128, rope_base=150000.0,
        vocab_size=s["n_normal"] + s["n_special"] if fast else o200k.N_VOCAB,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "original_max_position_embeddings": 4096})


class SynthWeights(RandomWeights):
    """RandomWeights plus the published checkpoint's MXFP4 expert form (`*_blocks`, `*_scales`),
    so experts are written as MXFP4 directly instead of being quantized from floats."""

    def __init__(self, c: GptOssConfig, seed: int = 0):
        super().__init__(c, seed)
        self._mxfp4: dict[str, tuple[int, ...]] = {}
        for i in range(c.n_layer):
            e = f"model.layers.{i}.mlp.experts."
            for hf, n_out, n_in in (("gate_up_proj", 2 * c.n_ff, c.n_embd), ("down_proj", c.n_embd, c.n_ff)):
                self._mxfp4[e + hf + "_blocks"] = (c.n_expert, n_out, n_in // 32, 16)
                self._mxfp4[e + hf + "_scales"] = (c.n_expert, n_out, n_in // 32)

    def __contains__(self, name: str) -> bool:
        return name in self._mxfp4 or super().__contains__(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._mxfp4[name] if name in self._mxfp4 else super().shape(name)

    def raw(self, name: str) -> np.ndarray:
        if name not in self._mxfp4:
            return super().raw(name)
        shape = self._mxfp4[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if name.endswith("_blocks"):
            return rng.integers(0, 256, shape, dtype=np.uint8)
        # E8M0 2^-8 .. 2^-6: FP4 codes (|v| <= 6) then give weights of about 1/sqrt(fan_in)
        return rng.integers(119, 122, shape, dtype=np.uint8)


def synthetic_tokenizer(n_normal: int, n_special: int, template: str | None = None) -> GGUFTokenizer:
    """A byte-level BPE vocabulary of n_normal normal tokens (the 256 bytes, then byte pairs, then
    byte triples, each with the merge that makes it) followed by o200k_harmony's first n_special
    special ids (>= 21: every named one), at the same offsets from n_normal as they have from
    199,998: tokenizes, detokenizes and formats chats like the real one, without its rank table."""
    if not 21 <= n_special <= o200k.N_VOCAB - o200k.N_BASE:
        raise ValueError(f"n_special must be in 21 .. {o200k.N_VOCAB - o200k.N_BASE}, got {n_special}")
    if not 256 <= n_normal <= 256 + 256**2 + 256**3:
        raise ValueError(f"n_normal must be in 256 .. {256 + 256**2 + 256**3}, got {n_normal}")
    text = [o200k.to_gpt2_text(bytes([b])) for b in range(256)]
    tokens, merges = list(text), []
    for i in range(n_normal - 256):
        if i < 256**2:
            a, b = text[i // 256], text[i % 256]
        else:
            j = i - 256**2
            a, b = text[j // 65536] + text[j // 256 % 256], text[j % 256]
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    tokens += [o200k.special_token_text(o200k.N_BASE + k) for k in range(n_special)]
    shift = n_normal - o200k.N_BASE
    return GGUFTokenizer(tokens=tokens, token_types=[TOKEN_NORMAL] * n_normal + [TOKEN_CONTROL] * n_special,
                         merges=merges, pre="gpt-4o", bos_id=o200k.BOS_ID + shift, eos_id=o200k.EOS_ID + shift,
                         pad_id=o200k.PAD_ID + shift, add_bos=False, add_eos=False, chat_template=template)


# The type mixes `--mix` writes. mxfp4: ggml-org's files (MXFP4 experts, Q8_0 other matrices).
# q4_k_m: unsloth's "Q4_K_M" gpt-oss files, per tensor what llama.cpp's quantizer gives (docs/gpt-oss.md):
# Q4_K where a row is a multiple of 256 values (attn_output, 4096 wide), else its 32-block fallback
# Q5_0; Q6_K (output, and attn_v in the layers use_more_bits picks) falls back to Q8_0; experts
# stay MXFP4, norms/biases/router F32. q5_k_m: the same with Q5_K, whose fallback is Q5_1. f16: the
# "F16" gpt-oss files (unsloth's): F16 attention, embeddings and output, the same MXFP4 experts.
# general.file_type says which (38 MXFP4_MOE, 15 Q4_K_M, 17 Q5_K_M, 1 MOSTLY_F16).
MIXES = ("mxfp4", "q4_k_m", "q5_k_m", "f16")
_MIX_FILE_TYPE = {"q4_k_m": 15, "q5_k_m": 17, "f16": 1}
_K_MIX_TYPE = {"q4_k_m": QT.Q4_K, "q5_k_m": QT.Q5_K}
_K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v gets the larger K-quant in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def k_mix_type(t: PlannedTensor, n_layer: int, mix: str = "q4_k_m") -> QT:
    """The type a Q4_K_M (Q5_K_M) gpt-oss file gives planned tensor `t` (planned as the mxfp4 mix)."""
    if t.qtype != QT.Q8_0:
        return t.qtype  # MXFP4 experts, F32 vectors and router
    m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
    k_type = QT.Q6_K if t.name == "output.weight" or (
        m and m[2] == "attn_v" and _use_more_bits(int(m[1]), n_layer)) else _K_MIX_TYPE[mix]
    ne0 = t.shape[-1]
    qtype = k_type if ne0 % 256 == 0 else _K_FALLBACK[k_type]
    if qtype == QT.Q6_K:
        raise ValueError(f"{t.name}: Q6_K rows ({ne0} wide) are not drawn by synth; every shape here "
                         "has n_embd not a multiple of 256, so Q6_K tensors fall back to Q8_0")
    return qtype


# RMS of a block's values, in units of its scale d, when its code bytes are uniform random (Q5_1 with
# m = -15.5 d, Q4_K with dmin = 7.5 d, Q5_K with dmin = 15.5 d, which centre the values on zero on
# average): the drawn scales divide it out
_CODE_RMS = {QT.Q8_0: 73.9, QT.Q5_0: 9.25, QT.Q5_1: 9.23, QT.Q4_K: 258.5, QT.Q5_K: 526.9}
_CENTRE = {QT.Q5_1: -15.5, QT.Q4_K: 7.5, QT.Q5_K: 15.5}  # the second f16 of the block, in units of d


def random_blocks(t: PlannedTensor, rng: np.random.Generator) -> np.ndarray:
    """Finished blocks of random bytes for quantized tensor `t`, with scales that give RandomWeights'
    spread (std 1 for the embedding, 1/sqrt(fan_in) for the rest; block scales uniform in
    [0.5, 1.5] x d0, mean square 13/12 x d0^2); MXFP4: random nibbles, SynthWeights' E8M0 scales."""
    block, size = quants.GGML_QUANT_SIZES[t.qtype]
    n_rows, n_blocks = int(np.prod(t.shape[:-1])), t.shape[-1] // block
    blocks = np.frombuffer(bytearray(rng.bytes(n_rows * n_blocks * size)), np.uint8)
    blocks = blocks.reshape(n_rows, n_blocks, size)
    if t.qtype == QT.MXFP4:
        blocks[:, :, 0] = 119 + blocks[:, :, 0] % 3  # E8M0 2^-8 .. 2^-6, as SynthWeights
    else:
        std = 1.0 if t.name.startswith("token_embd.") else t.shape[-1] ** -0.5
        d0 = std / (_CODE_RMS[t.qtype] * (13 / 12) ** 0.5)
        d = rng.uniform(0.5, 1.5, (n_rows, n_blocks)).astype(np.float32) * np.float32(d0)
        blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(n_rows, n_blocks, 2)
        if t.qtype in _CENTRE:
            blocks[:, :, 2:4] = (d * _CENTRE[t.qtype]).astype(np.float16).view(np.uint8).reshape(n_rows, n_blocks, 2)
    return blocks.reshape(*t.shape[:-1], n_blocks * size)


class _Replan:
    """write_gguf's replan for a mix and mode: retypes tensors for the K-quant and f16 mixes, and draws as
    finished blocks (random_blocks) every Q4_K / Q5_K matrix (gguf.quants cannot quantize them) and, with
    fast, every quantized matrix, layer 0's bytes then serving every layer (per type: attn_v's
    type varies by layer in q4_k_m). The rest is quantized from RandomWeights' floats."""

    def __init__(self, seed: int, mix: str, fast: bool, n_layer: int):
        self.seed, self.mix, self.fast, self.n_layer = seed, mix, fast, n_layer
        self.cache: dict[tuple[str, QT], np.ndarray] = {}

    def __call__(self, t: PlannedTensor) -> PlannedTensor:
        if self.mix in _K_MIX_TYPE:
            t = dataclasses.replace(t, qtype=k_mix_type(t, self.n_layer, self.mix))
        elif self.mix == "f16" and t.qtype == QT.Q8_0:
            t = dataclasses.replace(t, qtype=QT.F16)
        if t.qtype not in (QT.Q4_K, QT.Q5_K) and not (self.fast and t.qtype in (QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.MXFP4)):
            return t
        key = (re.sub(r"^blk\.\d+\.", "blk.0.", t.name), t.qtype)

        def produce() -> np.ndarray:
            if self.fast and key in self.cache:
                return self.cache[key]
            blocks = random_blocks(t, np.random.default_rng([self.seed, zlib.crc32(t.name.encode())]))
            if self.fast:
                self.cache[key] = blocks
            return blocks
        return dataclasses.replace(t, produce=produce, raw=True)


def write_synth_model(path: str | os.PathLike, shape: str = "gpt-oss-20b", *, n_layer: int | None = None,
                      arch_name: str = "gptoss", seed: int = 0, force: bool = False, fast: bool = False,
                      mix: str = "mxfp4", progress: ProgressFn | None = None) -> Path:
    """Write a random-weight GGUF with `shape`'s dimensions and `mix`'s type layout (MIXES; default
    ggml-org's), atomically. fast: layer 0 repeated, quantized matrices drawn as blocks, synthetic
    vocabulary (see the module docstring). Raises FileExistsError if `path` exists and not `force`."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    c = shape_config(shape, n_layer, fast)
    if fast:
        tok = synthetic_tokenizer(SHAPES[shape]["n_normal"], SHAPES[shape]["n_special"], chat_template())
    else:
        tok = o200k.gguf_tokenizer(chat_template())
    return write_gguf(SynthWeights(c, seed), c, tok, path, outtype="mxfp4", arch_name=arch_name,
                      name=f"{shape}-synth", force=force, progress=progress,
                      replan=_Replan(seed, mix, fast, c.n_layer), file_type=_MIX_FILE_TYPE.get(mix))
