"""Small random gpt-oss GGUF files in every layout real files use, written with gguf.GGUFWriter.

Reusable by every branch's tests:

    from gguf_factory import write_gptoss_gguf
    weights = write_gptoss_gguf(tmp_path / "m.gguf", layout="ollama-gen1", expert_type="mxfp4")

`weights` maps canonical (llama.cpp) tensor names to the float32 values the file represents, i.e.
after the file's own rounding (quantization, F16/BF16), in numpy order (reversed GGUF ne): matrices
(n_out, n_in), experts (n_expert, n_out, n_in), expert biases (n_expert, n_ff). The same seed and
dimensions give the same values in every layout and spelling (except Gen-1's BF16 expert biases,
which are BF16-rounded there), so tests can check that the loader normalises them identically.

Layouts (docs/loader.md):
- "llama.cpp": attn_q/k/v, attn_output, post_attention_norm, attn_sinks.weight, split experts, MXFP4 = 39.
- "ollama-gen2": split tensors with Ollama's names attn_out, ffn_norm, attn_sinks (no .weight).
- "ollama-gen1": fused attn_qkv (Q|K|V row blocks), fused ffn_gate_up_exps (even rows gate, odd rows
  up; biases likewise), BF16 expert biases, MXFP4 experts as ggml type 4 in OpenAI nibble order
  (byte i = elements 2i | 2i+1 << 4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0,
         "q5_1": QT.Q5_1, "mxfp4": QT.MXFP4}
OPENAI_MXFP4_TYPE = 4  # ggml's retired Q4_2 id, reused by Ollama Gen-1 for OpenAI-order MXFP4
LAYOUTS = ("llama.cpp", "ollama-gen2", "ollama-gen1")
OLLAMA_NAMES = {"attn_output.weight": "attn_out.weight", "attn_output.bias": "attn_out.bias",
                "post_attention_norm.weight": "ffn_norm.weight", "attn_sinks.weight": "attn_sinks"}


def dims(n_vocab: int = 300, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_head_kv: int = 2,
         head_dim: int = 16, n_expert: int = 4, n_expert_used: int = 2, n_ff: int = 64) -> dict:
    """The default small dimensions (all multiples of 32 where a block type may be used)."""
    return {"n_vocab": n_vocab, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "n_head_kv": n_head_kv,
            "head_dim": head_dim, "n_expert": n_expert, "n_expert_used": n_expert_used, "n_ff": n_ff}


def random_weights(seed: int = 0, **dim_overrides: int) -> dict[str, np.ndarray]:
    """Random float32 weights (canonical names, numpy order) for a small gpt-oss."""
    d = dims(**dim_overrides)
    rng = np.random.default_rng(seed)
    e, f, x = d["n_embd"], d["n_ff"], d["n_expert"]
    q, kv = d["n_head"] * d["head_dim"], d["n_head_kv"] * d["head_dim"]

    def r(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"token_embd.weight": r(d["n_vocab"], e), "output_norm.weight": 1 + r(e, scale=0.1),
         "output.weight": r(d["n_vocab"], e)}
    for i in range(d["n_layer"]):
        b = f"blk.{i}"
        w.update({
            f"{b}.attn_norm.weight": 1 + r(e, scale=0.1),
            f"{b}.attn_q.weight": r(q, e), f"{b}.attn_q.bias": r(q),
            f"{b}.attn_k.weight": r(kv, e), f"{b}.attn_k.bias": r(kv),
            f"{b}.attn_v.weight": r(kv, e), f"{b}.attn_v.bias": r(kv),
            f"{b}.attn_output.weight": r(e, q), f"{b}.attn_output.bias": r(e),
            f"{b}.attn_sinks.weight": r(d["n_head"]),
            f"{b}.post_attention_norm.weight": 1 + r(e, scale=0.1),
            f"{b}.ffn_gate_inp.weight": r(x, e), f"{b}.ffn_gate_inp.bias": r(x),
            f"{b}.ffn_gate_exps.weight": r(x, f, e), f"{b}.ffn_gate_exps.bias": r(x, f),
            f"{b}.ffn_up_exps.weight": r(x, f, e), f"{b}.ffn_up_exps.bias": r(x, f),
            f"{b}.ffn_down_exps.weight": r(x, e, f), f"{b}.ffn_down_exps.bias": r(x, e),
        })
    return w


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to BF16 (round to nearest even), as float32."""
    return dequantize(quantize(a.astype(np.float32), QT.BF16), QT.BF16)


def to_openai_mxfp4(ggml_bytes: np.ndarray) -> np.ndarray:
    """ggml block_mxfp4 bytes (byte j = elements j | j+16 << 4) -> OpenAI's order (byte i = elements
    2i | 2i+1 << 4), as Ollama's Gen-1 files store them under type 4."""
    blocks = ggml_bytes.reshape(-1, 17)
    codes = np.concatenate([blocks[:, 1:] & 0x0F, blocks[:, 1:] >> 4], axis=1)  # element order 0..31
    out = blocks.copy()
    out[:, 1:] = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return out.reshape(ggml_bytes.shape)


def _encode(a: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(bytes to write, float32 values they represent)."""
    raw = quantize(a, qtype)
    if qtype in (QT.F32, QT.F16):
        return raw, raw.astype(np.float32)
    return raw, dequantize(raw, qtype).reshape(a.shape).astype(np.float32)


def _tensor_type(name: str, wtype: str, expert_type: str, overrides: dict[str, str] | None = None) -> QT:
    for suffix, t in (overrides or {}).items():
        if name.endswith(suffix):
            return TYPES[t]
    if name.endswith("_exps.weight"):
        return TYPES[expert_type]
    if name.endswith((".bias", "norm.weight")) or "sinks" in name or "gate_inp" in name:
        return QT.F32
    return TYPES[wtype]


def _add_tokenizer(w: GGUFWriter, n_vocab: int, n_merges: int, rng: np.random.Generator) -> None:
    tokens = [f"t{i}" for i in range(n_vocab - 3)] + ["<|start|>", "<|end|>", "<|return|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types([1] * (n_vocab - 3) + [3, 3, 3])
    left, right = rng.integers(0, 1000, n_merges), rng.integers(0, 1000, n_merges)
    w.add_token_merges([f"t{a} t{b}" for a, b in zip(left.tolist(), right.tolist())])
    w.add_eos_token_id(n_vocab - 1)


def write_gptoss_gguf(path: str | Path, *, arch: str = "gptoss", layout: str = "llama.cpp",
                      wtype: str = "f32", expert_type: str = "f32", seed: int = 0,
                      drop_keys: tuple[str, ...] = (), drop_tensors: tuple[str, ...] = (),
                      tie_output: bool = False, with_tokenizer: bool = False, n_merges: int = 50, write_ff_key: bool | None = None,
                      extra_keys: dict | None = None, split_max_tensors: int = 0,
                      name: str = "gpt-oss-tiny", type_overrides: dict[str, str] | None = None,
                      **dim_overrides: int) -> dict[str, np.ndarray]:
    """Write a random small gpt-oss GGUF file and return the float32 weights it represents.

    arch: "gptoss" or "gpt-oss" (key prefix follows). layout: one of LAYOUTS. wtype: type of the
    2-D matrices (token_embd, output, attention): f32 f16 bf16 q8_0. expert_type: type of the
    *_exps.weight tensors: f32 f16 bf16 q8_0 mxfp4 (Gen-1 writes mxfp4 as OpenAI-order type 4).
    drop_keys: hyperparameter suffixes to leave out (e.g. "context_length"). drop_tensors: canonical
    names to leave out. tie_output: omit output.weight (then weights["output.weight"] is the
    embedding). write_ff_key: write expert_feed_forward_length (default: not for Ollama layouts,
    which never write it). split_max_tensors > 0 writes NAME-0000i-of-0000N.gguf shards instead.
    with_tokenizer: write gpt2-style tokenizer keys (n_vocab tokens, token_type, n_merges merges).
    type_overrides: {name suffix: type} for the tensors whose canonical name ends so (e.g.
    {"attn_q.weight": "f16"}: a file mixing kinds within q|k|v; llama.cpp layout). dim_overrides:
    see dims()."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    d = dims(**dim_overrides)
    weights = random_weights(seed, **dim_overrides)
    rng = np.random.default_rng(seed + 1)
    gen1 = layout == "ollama-gen1"
    if write_ff_key is None:
        write_ff_key = layout == "llama.cpp"

    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    _add_hparams(w, arch, d, drop_keys, write_ff_key)
    for key, value in (extra_keys or {}).items():
        w.add_key_value(key, value[0], value[1]) if isinstance(value, tuple) else w.add_string(key, value)
    if with_tokenizer:
        _add_tokenizer(w, d["n_vocab"], n_merges, rng)

    represented: dict[str, np.ndarray] = {}

    def put(file_name: str, canonical: str | None, a: np.ndarray, qtype: QT) -> None:
        raw, values = _encode(a, qtype)
        if canonical is not None:
            represented[canonical] = values
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(file_name, raw)
        else:
            w.add_tensor(file_name, raw, raw_dtype=qtype)

    out_names = OLLAMA_NAMES if layout != "llama.cpp" else {}
    for cname, a in weights.items():
        if cname in drop_tensors or (tie_output and cname == "output.weight"):
            continue
        part = cname.split(".", 2)[-1]
        if gen1 and part in ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
                             "attn_v.weight", "attn_v.bias", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                             "ffn_gate_exps.bias", "ffn_up_exps.bias"):
            continue  # written fused below
        if gen1 and part.endswith("_exps.bias"):
            _put_bf16(w, cname, a, represented)
            continue
        if gen1 and part == "ffn_down_exps.weight" and expert_type == "mxfp4":
            _put_type4(w, cname, a, represented)
            continue
        fname = cname
        if part in out_names:
            fname = cname[: -len(part)] + out_names[part]
        put(fname, cname, a, _tensor_type(cname, wtype, expert_type, type_overrides))
    if gen1:
        for i in range(d["n_layer"]):
            if f"blk.{i}.attn_q.weight" not in drop_tensors:
                _put_gen1_fused(w, weights, f"blk.{i}", wtype, expert_type, represented)
    if tie_output:
        represented["output.weight"] = represented["token_embd.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return represented


def _add_hparams(w: GGUFWriter, p: str, d: dict, drop_keys: tuple[str, ...], write_ff_key: bool,
                 n_ctx: int = 4096) -> None:
    keys = {
        "context_length": (n_ctx, "uint32"),
        "embedding_length": (d["n_embd"], "uint32"),
        "block_count": (d["n_layer"], "uint32"), "feed_forward_length": (d["n_ff"], "uint32"),
        "attention.head_count": (d["n_head"], "uint32"), "attention.head_count_kv": (d["n_head_kv"], "uint32"),
        "attention.key_length": (d["head_dim"], "uint32"), "attention.value_length": (d["head_dim"], "uint32"),
        "attention.layer_norm_rms_epsilon": (1e-5, "float32"), "attention.sliding_window": (128, "uint32"),
        "expert_count": (d["n_expert"], "uint32"), "expert_used_count": (d["n_expert_used"], "uint32"),
        "rope.freq_base": (150000.0, "float32"), "rope.scaling.factor": (32.0, "float32"),
        "rope.scaling.original_context_length": (4096, "uint32"),
    }
    if write_ff_key:
        keys["expert_feed_forward_length"] = (d["n_ff"], "uint32")
        keys["rope.scaling.type"] = ("yarn", "string")
    for key, (value, kind) in keys.items():
        if key not in drop_keys:
            getattr(w, f"add_{kind}")(f"{p}.{key}", value)


GPT_OSS_20B = {"n_vocab": 201088, "n_embd": 2880, "n_layer": 24, "n_head": 64, "n_head_kv": 8, "head_dim": 64,
               "n_expert": 32, "n_expert_used": 4, "n_ff": 2880}


def write_sparse_gptoss_gguf(path: str | Path, *, arch: str = "gpt-oss", n_merges: int = 446189,
                             **dim_overrides: int) -> int:
    """Write a gpt-oss file with real gpt-oss-20b shapes and types (Q8_0 embeddings/attention, MXFP4
    experts, F32 rest: 459 tensors, ~12 GB) and the full-size tokenizer arrays, whose tensor data is
    all zeros and left as a hole in a sparse file (no disk used). For load-time and memory tests.
    Returns the file size in bytes."""
    d = {**GPT_OSS_20B, **dim_overrides}
    w = GGUFWriter(str(path), arch)
    w.add_name("gpt-oss-20b-sparse")
    _add_hparams(w, arch, d, (), True, n_ctx=131072)
    _add_tokenizer(w, d["n_vocab"], n_merges, np.random.default_rng(0))
    data_size = 0
    for name, a in _shapes(d).items():
        qtype = _tensor_type(name, "q8_0", "mxfp4")
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(a)) // block * size
        w.add_tensor_info(name, a, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        data_size += GGUFWriter.ggml_pad(nbytes, w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total = GGUFWriter.ggml_pad(fout.tell(), w.data_alignment) + data_size
    fout.truncate(total)
    fout.close()
    return total


def _shapes(d: dict) -> dict[str, tuple[int, ...]]:
    """Canonical tensor shapes in numpy order, without generating any values."""
    e, f, x, v = d["n_embd"], d["n_ff"], d["n_expert"], d["n_vocab"]
    q, kv = d["n_head"] * d["head_dim"], d["n_head_kv"] * d["head_dim"]
    shapes = {"token_embd.weight": (v, e), "output_norm.weight": (e,), "output.weight": (v, e)}
    for i in range(d["n_layer"]):
        b = f"blk.{i}"
        shapes.update({
            f"{b}.attn_norm.weight": (e,), f"{b}.attn_q.weight": (q, e), f"{b}.attn_q.bias": (q,),
            f"{b}.attn_k.weight": (kv, e), f"{b}.attn_k.bias": (kv,), f"{b}.attn_v.weight": (kv, e),
            f"{b}.attn_v.bias": (kv,), f"{b}.attn_output.weight": (e, q), f"{b}.attn_output.bias": (e,),
            f"{b}.attn_sinks.weight": (d["n_head"],), f"{b}.post_attention_norm.weight": (e,),
            f"{b}.ffn_gate_inp.weight": (x, e), f"{b}.ffn_gate_inp.bias": (x,),
            f"{b}.ffn_gate_exps.weight": (x, f, e), f"{b}.ffn_gate_exps.bias": (x, f),
            f"{b}.ffn_up_exps.weight": (x, f, e), f"{b}.ffn_up_exps.bias": (x, f),
            f"{b}.ffn_down_exps.weight": (x, e, f), f"{b}.ffn_down_exps.bias": (x, e),
        })
    return shapes


def _put_bf16(w: GGUFWriter, name: str, a: np.ndarray, represented: dict) -> None:
    raw = quantize(a, QT.BF16)
    w.add_tensor(name, raw.view(np.uint8), raw_dtype=QT.BF16)
    represented[name] = dequantize(raw, QT.BF16).reshape(a.shape)


def _put_type4(w: GGUFWriter, name: str, a: np.ndarray, represented: dict) -> None:
    """Write MXFP4 as Ollama Gen-1 did: ggml type 4 with OpenAI nibble order, 17-byte blocks."""
    raw = quantize(a, QT.MXFP4)
    represented[name] = dequantize(raw, QT.MXFP4).reshape(a.shape)
    # int8 so that GGUFWriter takes raw_shape as the element shape instead of deriving it from bytes.
    w.add_tensor(name, to_openai_mxfp4(raw).view(np.int8), raw_shape=a.shape, raw_dtype=OPENAI_MXFP4_TYPE)


def _put_gen1_fused(w: GGUFWriter, weights: dict, b: str, wtype: str, expert_type: str,
                    represented: dict) -> None:
    qkv = np.concatenate([weights[f"{b}.attn_{k}.weight"] for k in "qkv"], axis=0)
    qtype = TYPES[wtype]
    raw, values = _encode(qkv, qtype)
    w.add_tensor(f"{b}.attn_qkv.weight", raw, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    sizes = np.cumsum([weights[f"{b}.attn_{k}.weight"].shape[0] for k in "qk"])
    for k, part in zip("qkv", np.split(values, sizes, axis=0)):
        represented[f"{b}.attn_{k}.weight"] = part
    qkv_bias = np.concatenate([weights[f"{b}.attn_{k}.bias"] for k in "qkv"])
    w.add_tensor(f"{b}.attn_qkv.bias", qkv_bias)
    for k, part in zip("qkv", np.split(qkv_bias, sizes)):
        represented[f"{b}.attn_{k}.bias"] = part

    gate, up = weights[f"{b}.ffn_gate_exps.weight"], weights[f"{b}.ffn_up_exps.weight"]
    fused = np.empty((gate.shape[0], 2 * gate.shape[1], gate.shape[2]), np.float32)
    fused[:, 0::2], fused[:, 1::2] = gate, up
    if expert_type == "mxfp4":
        raw = quantize(fused, QT.MXFP4)
        values = dequantize(raw, QT.MXFP4).reshape(fused.shape)
        w.add_tensor(f"{b}.ffn_gate_up_exps.weight", to_openai_mxfp4(raw).view(np.int8),
                     raw_shape=fused.shape, raw_dtype=OPENAI_MXFP4_TYPE)
    else:
        qtype = TYPES[expert_type]
        raw, values = _encode(fused, qtype)
        w.add_tensor(f"{b}.ffn_gate_up_exps.weight", raw,
                     raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)
    represented[f"{b}.ffn_gate_exps.weight"] = values[:, 0::2]
    represented[f"{b}.ffn_up_exps.weight"] = values[:, 1::2]

    gb, ub = weights[f"{b}.ffn_gate_exps.bias"], weights[f"{b}.ffn_up_exps.bias"]
    fused_b = np.empty((gb.shape[0], 2 * gb.shape[1]), np.float32)
    fused_b[:, 0::2], fused_b[:, 1::2] = gb, ub
    raw = quantize(fused_b, QT.BF16)
    w.add_tensor(f"{b}.ffn_gate_up_exps.bias", raw.view(np.uint8), raw_dtype=QT.BF16)
    values = dequantize(raw, QT.BF16).reshape(fused_b.shape)
    represented[f"{b}.ffn_gate_exps.bias"] = values[:, 0::2]
    represented[f"{b}.ffn_up_exps.bias"] = values[:, 1::2]
