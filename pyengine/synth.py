"""Random-weight gpt-oss GGUFs at the real shapes (gpt-oss-20b, gpt-oss-120b), for benchmarking.

Why: speed depends on shapes and weight types, not on what the weights say, so a file with the
real dimensions, the real quantization layout (MXFP4 experts, Q8_0 attention, embeddings and
output, F32 norms/biases/router: ggml-org's files) and the real o200k_harmony vocabulary times
exactly like the real model, without a 12 GB download. Experts are random MXFP4 codes with E8M0
scales chosen so activations stay finite; the rest comes from demo_model's RandomWeights. Written
by the converter's writer, like demo-model; `--layers` cuts the depth for quicker runs.

`fast=True` (`pyengine synth --fast`) writes the same shapes and types in seconds rather than
minutes, for a device check that cannot wait: layer 0's tensors are drawn once and repeated in
every layer, Q8_0 matrices are drawn as finished blocks (random int8 codes, scales that give the
same spread) instead of quantized from floats, and the vocabulary is a synthetic byte-level BPE one
of the same size (byte tokens, then byte pairs and triples with their merges, then the harmony
special tokens), so no o200k source package is needed. The `tiny` shape is a toy size (64 wide,
2 layers, 8 experts) for testing such scripts; with --fast its vocabulary has 277 tokens."""

from __future__ import annotations

import dataclasses
import os
import re
import zlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

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
          "tiny": {"n_embd": 64, "n_head": 8, "n_normal": 256, "n_special": 21, "n_layer": 2, "n_expert": 8}}


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


class _FastTensors:
    """The fast mode's replan for write_gguf: layer 0's bytes for every layer, and every quantized
    matrix drawn as finished blocks of random bytes: Q8_0 codes are then uniform int8 (std 73.9),
    so the block scales give RandomWeights' spread (std 1 for the embedding, 1/sqrt(fan_in) for the
    rest); MXFP4 codes are random nibbles with SynthWeights' E8M0 scales."""

    def __init__(self, seed: int):
        self.seed = seed
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, t: PlannedTensor) -> PlannedTensor:
        if t.qtype not in (QT.Q8_0, QT.MXFP4):
            return t
        kind = re.sub(r"^blk\.\d+\.", "blk.0.", t.name)

        def produce() -> np.ndarray:
            if kind not in self.cache:
                self.cache[kind] = self._blocks(t)
            return self.cache[kind]
        return dataclasses.replace(t, produce=produce, raw=True)

    def _blocks(self, t: PlannedTensor) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(t.name.encode())])
        n_rows, n_blocks = int(np.prod(t.shape[:-1])), t.shape[-1] // 32
        size = 34 if t.qtype == QT.Q8_0 else 17
        blocks = np.frombuffer(bytearray(rng.bytes(n_rows * n_blocks * size)), np.uint8)
        blocks = blocks.reshape(n_rows, n_blocks, size)
        if t.qtype == QT.Q8_0:
            std = 1.0 if t.name.startswith("token_embd.") else t.shape[-1] ** -0.5
            # scales uniform in [0.5, 1.5] x d0 have mean square 13/12 x d0^2
            d0 = std / (73.9 * (13 / 12) ** 0.5)
            d = rng.uniform(0.5, 1.5, (n_rows, n_blocks)).astype(np.float32) * np.float32(d0)
            blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(n_rows, n_blocks, 2)
        else:
            blocks[:, :, 0] = 119 + blocks[:, :, 0] % 3  # E8M0 2^-8 .. 2^-6, as SynthWeights
        return blocks.reshape(*t.shape[:-1], n_blocks * size)


def write_synth_model(path: str | os.PathLike, shape: str = "gpt-oss-20b", *, n_layer: int | None = None,
                      arch_name: str = "gptoss", seed: int = 0, force: bool = False, fast: bool = False,
                      progress: ProgressFn | None = None) -> Path:
    """Write a random-weight GGUF with `shape`'s dimensions and ggml-org's type layout (atomically).
    fast: layer 0 repeated, Q8_0 drawn as blocks, synthetic vocabulary (see the module docstring).
    Raises FileExistsError if `path` exists and not `force`."""
    c = shape_config(shape, n_layer, fast)
    if fast:
        tok = synthetic_tokenizer(SHAPES[shape]["n_normal"], SHAPES[shape]["n_special"], chat_template())
    else:
        tok = o200k.gguf_tokenizer(chat_template())
    return write_gguf(SynthWeights(c, seed), c, tok, path, outtype="mxfp4", arch_name=arch_name,
                      name=f"{shape}-synth", force=force, progress=progress,
                      replan=_FastTensors(seed) if fast else None)
