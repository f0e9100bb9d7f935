"""One canonical tensor set from every gpt-oss file layout that exists in the wild.

Three layouts (docs/loader.md, "Layouts and architectures"):
- llama.cpp `gpt-oss`: attn_q/k/v, attn_output, post_attention_norm, attn_sinks.weight, split
  ffn_gate_exps / ffn_up_exps, MXFP4 as ggml type 39 (current llama.cpp may fuse attn_qkv).
- Ollama Gen-2 (2025-10 on): split tensors under Ollama's names attn_out, ffn_norm, attn_sinks.
- Ollama Gen-1 (2025-08): fused attn_qkv (Q | K | V row blocks), fused ffn_gate_up_exps (even rows
  gate, odd rows up; biases likewise), BF16 expert biases, and MXFP4 stored as type 4 in OpenAI's
  nibble order.
Renames and row splits are zero-copy views; the type-4 repack and the bias widening/de-interleave
are copies. The result is keyed by llama.cpp names, then checked against the hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pyengine.gguf_reader import RawTensor, type_name
from pyengine.hparams import GptOssHParams
from pyengine.tensor import Tensor, rows_view

F32 = int(GGMLQuantizationType.F32)
BF16 = int(GGMLQuantizationType.BF16)
MXFP4 = int(GGMLQuantizationType.MXFP4)

# Ollama's per-block names -> llama.cpp's.
_RENAMES = {
    "attn_out.weight": "attn_output.weight",
    "attn_out.bias": "attn_output.bias",
    "ffn_norm.weight": "post_attention_norm.weight",
    "attn_sinks": "attn_sinks.weight",
}
OPTIONAL_BLOCK_TENSORS = ("attn_q.bias", "attn_k.bias", "attn_v.bias")


def canonical_name(name: str) -> str:
    """llama.cpp's name for a tensor name as any gpt-oss writer spells it."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _RENAMES:
        return f"blk.{parts[1]}.{_RENAMES[parts[2]]}"
    return name


def expert_ff_width(raw: Mapping[str, RawTensor]) -> int | None:
    """The expert FFN width as the expert tensors show it (Ollama never writes the key)."""
    gate = raw.get("blk.0.ffn_gate_exps.weight")
    if gate is not None and len(gate.shape) >= 2:
        return gate.shape[1]
    fused = raw.get("blk.0.ffn_gate_up_exps.weight")
    if fused is not None and len(fused.shape) >= 2 and fused.shape[1] % 2 == 0:
        return fused.shape[1] // 2
    return None


def repack_openai_mxfp4(data: np.ndarray) -> np.ndarray:
    """OpenAI-order MXFP4 blocks (byte i = elements 2i | 2i+1 << 4) -> ggml's block_mxfp4 order
    (byte j = elements j | j+16 << 4). The scale byte stays first. Returns a new array."""
    blocks = np.ascontiguousarray(data).reshape(-1, 17)
    q = blocks[:, 1:]
    elems = np.empty((blocks.shape[0], 32), dtype=np.uint8)
    elems[:, 0::2] = q & 0x0F
    elems[:, 1::2] = q >> 4
    out = np.empty_like(blocks)
    out[:, 0] = blocks[:, 0]
    out[:, 1:] = elems[:, :16] | (elems[:, 16:] << 4)
    return out.reshape(data.shape)


def widen_bf16(t: Tensor) -> Tensor:
    """A BF16 tensor as F32 (exact: BF16 is the top half of an F32)."""
    bits = np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16
    return Tensor(t.name, F32, t.shape, bits.view(np.uint8))


def _elem_size(ggml_type: int) -> tuple[int, int]:
    return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]


def _split_qkv(t: Tensor, hp: GptOssHParams, prefix: str, problems: list[str]) -> dict[str, Tensor]:
    """Ollama Gen-1's fused Q|K|V (row blocks, not per-head interleave) -> three views."""
    kind = t.name.rsplit(".", 1)[1]
    sizes = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.value_dim)
    axis = 1 if len(t.shape) == 2 else 0
    if len(t.shape) > 2 or t.shape[axis] != sum(sizes):
        problems.append(f"Tensor {t.name} has shape {list(t.shape)}; expected {sum(sizes)} Q|K|V rows "
                        f"({' + '.join(map(str, sizes))}) on its last axis")
        return {}
    out, start = {}, 0
    for part, n in zip(("attn_q", "attn_k", "attn_v"), sizes):
        name = f"{prefix}.{part}.{kind}"
        if axis == 1:
            out[name] = Tensor(name, t.ggml_type, (t.shape[0], n), t.data[start:start + n])
        else:
            block, size = _elem_size(t.ggml_type)
            if start % block or n % block:
                problems.append(f"Tensor {t.name} cannot be split at Q|K|V boundaries: its type "
                                f"{type_name(t.ggml_type)} has blocks of {block}")
                return {}
            a, b = start // block * size, (start + n) // block * size
            out[name] = Tensor(name, t.ggml_type, (n,), t.data[:, a:b])
        start += n
    return out


def _split_gate_up(t: Tensor, prefix: str, problems: list[str]) -> dict[str, Tensor]:
    """Ollama Gen-1's fused gate/up experts: even rows (elements, for the bias) gate, odd rows up."""
    kind = t.name.rsplit(".", 1)[1]
    gate, up = f"{prefix}.ffn_gate_exps.{kind}", f"{prefix}.ffn_up_exps.{kind}"
    if kind == "weight":
        if len(t.shape) != 3 or t.shape[1] % 2:
            problems.append(f"Tensor {t.name} has shape {list(t.shape)}; expected [n_embd, 2*n_ff, n_expert]")
            return {}
        shape = (t.shape[0], t.shape[1] // 2, t.shape[2])
        return {gate: Tensor(gate, t.ggml_type, shape, t.data[:, 0::2]),
                up: Tensor(up, t.ggml_type, shape, t.data[:, 1::2])}
    block, size = _elem_size(t.ggml_type)
    if len(t.shape) != 2 or t.shape[0] % 2 or block != 1:
        problems.append(f"Tensor {t.name} has shape {list(t.shape)} and type {type_name(t.ggml_type)}; "
                        f"expected a float [2*n_ff, n_expert] bias")
        return {}
    n_expert, n_ff = t.shape[1], t.shape[0] // 2
    pairs = t.data.reshape(n_expert, n_ff, 2 * size)
    shape = (n_ff, n_expert)
    return {gate: Tensor(gate, t.ggml_type, shape, np.ascontiguousarray(pairs[:, :, :size]).reshape(n_expert, -1)),
            up: Tensor(up, t.ggml_type, shape, np.ascontiguousarray(pairs[:, :, size:]).reshape(n_expert, -1))}


def expected_shapes(hp: GptOssHParams, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor's GGUF shape (ne order) for these hyperparameters."""
    e, f, x = hp.n_embd, hp.n_ff_exp, hp.n_expert
    q, kv, vo = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.value_dim
    shapes = {"token_embd.weight": (e, n_vocab), "output_norm.weight": (e,), "output.weight": (e, n_vocab)}
    for i in range(hp.n_layer):
        b = f"blk.{i}"
        shapes.update({
            f"{b}.attn_norm.weight": (e,),
            f"{b}.attn_q.weight": (e, q), f"{b}.attn_q.bias": (q,),
            f"{b}.attn_k.weight": (e, kv), f"{b}.attn_k.bias": (kv,),
            f"{b}.attn_v.weight": (e, vo), f"{b}.attn_v.bias": (vo,),
            f"{b}.attn_output.weight": (hp.n_head * hp.value_dim, e), f"{b}.attn_output.bias": (e,),
            f"{b}.attn_sinks.weight": (hp.n_head,),
            f"{b}.post_attention_norm.weight": (e,),
            f"{b}.ffn_gate_inp.weight": (e, x), f"{b}.ffn_gate_inp.bias": (x,),
            f"{b}.ffn_gate_exps.weight": (e, f, x), f"{b}.ffn_gate_exps.bias": (f, x),
            f"{b}.ffn_up_exps.weight": (e, f, x), f"{b}.ffn_up_exps.bias": (f, x),
            f"{b}.ffn_down_exps.weight": (f, e, x), f"{b}.ffn_down_exps.bias": (e, x),
        })
    return shapes


def normalise_tensors(raw: Mapping[str, RawTensor], tensor_bytes: Callable[[RawTensor], np.ndarray],
                      hp: GptOssHParams) -> tuple[dict[str, Tensor], list[str]]:
    """Canonical tensors from any gpt-oss layout, plus the problems found (missing tensors, shapes
    that contradict the hyperparameters). Unknown extra tensors are kept under their own names."""
    problems: list[str] = []
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}

    def put(t: Tensor, from_name: str) -> None:
        if t.name in out:
            problems.append(f"Tensor {t.name} is given twice (as {source[t.name]} and {from_name})")
        out[t.name] = t
        source[t.name] = from_name

    for r in raw.values():
        name = canonical_name(r.name)
        data = rows_view(tensor_bytes(r), r.shape)
        ggml_type = r.ggml_type
        if r.openai_mxfp4:
            data, ggml_type = repack_openai_mxfp4(data), MXFP4
        t = Tensor(name, ggml_type, r.shape, data)
        pieces = name.split(".", 2)
        prefix, part = (f"blk.{pieces[1]}", pieces[2]) if pieces[0] == "blk" and len(pieces) == 3 else ("", name)
        if part in ("attn_qkv.weight", "attn_qkv.bias"):
            parts = _split_qkv(t, hp, prefix, problems)
        elif part in ("ffn_gate_up_exps.weight", "ffn_gate_up_exps.bias"):
            parts = _split_gate_up(t, prefix, problems)
        else:
            parts = {name: t}
        for p in parts.values():
            if p.name.endswith("_exps.bias") and p.ggml_type == BF16:
                p = widen_bf16(p)
            put(p, r.name)

    if "token_embd.weight" not in out:
        problems.append("Missing required tensor: token_embd.weight")
        return out, problems
    n_vocab = out["token_embd.weight"].shape[-1]
    out.setdefault("output.weight", out["token_embd.weight"])
    for name, shape in expected_shapes(hp, n_vocab).items():
        t = out.get(name)
        if t is None:
            if name.split(".", 2)[-1] not in OPTIONAL_BLOCK_TENSORS:
                problems.append(f"Missing required tensor: {name} (expected shape {list(shape)})")
        elif tuple(t.shape) != shape:
            problems.append(f"Tensor {name} has shape {list(t.shape)}; the hyperparameters require "
                            f"{list(shape)}")
    return out, problems
