"""transformers GptOssForCausalLM built from canonical (GGUF-named) float32 weights, for tests.

The inverse of the HF -> GGUF tensor mapping (docs/gpt-oss.md, "Tensors"): lets a test
run transformers on exactly the values a GGUF file represents (after its own quantization)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def hf_model_from_gguf_weights(weights: dict[str, np.ndarray], hp) -> "torch.nn.Module":
    """A float32 eager-attention GptOssForCausalLM with the given weights (gguf_factory's
    `represented` dict) and the hyperparameters of the file (GptOssHParams)."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    n_vocab = weights["token_embd.weight"].shape[0]
    cfg = GptOssConfig(
        vocab_size=n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff_exp,
        num_hidden_layers=hp.n_layer, num_attention_heads=hp.n_head, num_key_value_heads=hp.n_head_kv,
        head_dim=hp.head_dim, num_local_experts=hp.n_expert, num_experts_per_tok=hp.n_expert_used,
        rms_norm_eps=hp.rms_eps, sliding_window=hp.sliding_window, max_position_embeddings=hp.n_ctx_train,
        layer_types=["sliding_attention" if s else "full_attention" for s in hp.swa_layers],
        tie_word_embeddings=False, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": hp.rope_base, "factor": hp.rope_factor,
                         "original_max_position_embeddings": hp.rope_orig_ctx,
                         "beta_fast": hp.yarn_beta_fast, "beta_slow": hp.yarn_beta_slow, "truncate": False})
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # the plain per-expert loop (also works in float64)
    model = GptOssForCausalLM(cfg).to(torch.float32)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd = {"model.embed_tokens.weight": t(weights["token_embd.weight"]),
          "model.norm.weight": t(weights["output_norm.weight"]),
          "lm_head.weight": t(weights["output.weight"])}
    for i in range(hp.n_layer):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(weights[b + "attn_norm.weight"])
        sd[p + "post_attention_layernorm.weight"] = t(weights[b + "post_attention_norm.weight"])
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            sd[p + f"self_attn.{h}.weight"] = t(weights[b + g + ".weight"])
            sd[p + f"self_attn.{h}.bias"] = t(weights[b + g + ".bias"])
        sd[p + "self_attn.sinks"] = t(weights[b + "attn_sinks.weight"])
        sd[p + "mlp.router.weight"] = t(weights[b + "ffn_gate_inp.weight"])
        sd[p + "mlp.router.bias"] = t(weights[b + "ffn_gate_inp.bias"])
        gate, up = weights[b + "ffn_gate_exps.weight"], weights[b + "ffn_up_exps.weight"]  # (E, F, D)
        gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]), np.float32)
        gate_up[:, :, 0::2], gate_up[:, :, 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
        gb, ub = weights[b + "ffn_gate_exps.bias"], weights[b + "ffn_up_exps.bias"]
        gate_up_b = np.empty((gb.shape[0], 2 * gb.shape[1]), np.float32)
        gate_up_b[:, 0::2], gate_up_b[:, 1::2] = gb, ub
        e = p + "mlp.experts."
        sd[e + "gate_up_proj"], sd[e + "gate_up_proj_bias"] = t(gate_up), t(gate_up_b)
        sd[e + "down_proj"] = t(weights[b + "ffn_down_exps.weight"].transpose(0, 2, 1))
        sd[e + "down_proj_bias"] = t(weights[b + "ffn_down_exps.bias"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
    """float64 logits (len(tokens), n_vocab) of one sequence."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens, dtype=np.int64))[None], use_cache=False)
    return out.logits[0].double().numpy()


def yarn_omega(d: int, base: float, factor: float, orig: float, beta_fast: float, beta_slow: float
               ) -> tuple[np.ndarray, float]:
    """YaRN angular frequencies in float64 from the paper's formulas (fractional correction range,
    transformers' truncate=False), and the cos/sin magnitude 0.1 ln(factor) + 1."""
    import math

    def corr(beta: float) -> float:
        return d * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(corr(beta_fast), 0.0), min(corr(beta_slow), d - 1.0)
    i = np.arange(d // 2, dtype=np.float64)
    ramp = np.clip((i - low) / (high - low), 0, 1)
    omega = base ** (-2 * i / d)
    return omega / factor * ramp + omega * (1 - ramp), 0.1 * math.log(factor) + 1


def to_float64(model, hp) -> "torch.nn.Module":
    """The same transformers model computing in float64, RoPE angles included (transformers forms
    p * omega in float32, which at positions in the hundreds perturbs logits by ~1e-5..1e-4 on
    sharp attention; this removes that from the reference). Checks its frequencies against
    transformers' own float32 ones first."""
    import torch

    omega, mscale = yarn_omega(hp.head_dim, hp.rope_base, hp.rope_factor, hp.rope_orig_ctx,
                               hp.yarn_beta_fast, hp.yarn_beta_slow)
    rot = model.model.rotary_emb
    np.testing.assert_allclose(rot.inv_freq.double().numpy(), omega, rtol=1e-6)
    assert abs(rot.attention_scaling - mscale) < 1e-6
    model = model.double()
    om = torch.from_numpy(omega)

    def forward(x, position_ids):
        ang = position_ids.double()[..., None] * om
        return (torch.cos(ang) * mscale).to(x.dtype), (torch.sin(ang) * mscale).to(x.dtype)

    rot.forward = forward
    return model
