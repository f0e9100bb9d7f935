"""Tiny random gpt-oss checkpoints in the Hugging Face folder format, for tests.

Real gpt-oss checkpoints are 13-65 GB; tests need something with the same *structure* that
transformers (the numerical reference) and llama.cpp's converter (the format reference) both
accept: the published config.json keys (YaRN `rope_scaling`, alternating `layer_types`,
`head_dim * heads != hidden`), non-zero sinks and biases (random init leaves them zero, which would
hide sink/bias bugs), and optionally the published MXFP4 expert form (`*_blocks` / `*_scales`).

    cfg = make_hf_gptoss(tmp_path / "hf", seed=0, n_layer=2, mxfp4=True)
    model = load_hf_gptoss(tmp_path / "hf")          # float32 transformers model (MXFP4 dequantized)

The tokenizer is the real o200k_harmony vocabulary (201,088 ids, from `bpe-openai`'s o200k_base ranks
plus the harmony special tokens), built once and cached: llama.cpp's converter identifies the
pre-tokenizer by hashing tokenizer output, so a made-up vocabulary would not convert.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pyengine import o200k

if TYPE_CHECKING:
    import torch

# The o200k_harmony vocabulary's sizes and ids, as the engine itself knows them.
VOCAB_SIZE, N_BASE_TOKENS = o200k.N_VOCAB, o200k.N_BASE
BOS_ID, PAD_ID, EOS_ID = o200k.BOS_ID, o200k.PAD_ID, o200k.EOS_ID
special_token_name = o200k.special_token_text

# A short harmony-style template (not the official one); enough to check that a converter carries
# chat_template.jinja into the GGUF verbatim and that llama.cpp parses it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}\n"
)

# E2M1 code -> value (OCP MX spec; same table as OpenAI's reference)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def cache_dir() -> Path:
    """Per-machine cache for slow-to-build test inputs (tokenizer.json, llama.cpp sdist)."""
    d = Path(tempfile.gettempdir()) / "pyengine-test-cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def o200k_tokenizer_json() -> Path:
    """Path of a cached tokenizer.json for o200k_harmony (built on first use, ~1 minute)."""
    path = cache_dir() / "o200k_harmony_tokenizer.json"
    if path.exists():
        return path
    import bpe_openai
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = bpe_openai.get_encoding("o200k_base")
    ranks = enc._mergeable_ranks
    assert len(ranks) == N_BASE_TOKENS
    fd, tiktoken_file = tempfile.mkstemp(suffix=".tiktoken", dir=cache_dir())
    with os.fdopen(fd, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    try:
        specials = [special_token_name(i) for i in range(N_BASE_TOKENS, VOCAB_SIZE)]
        tok = TikTokenConverter(vocab_file=tiktoken_file, pattern=enc._pat_str,
                                extra_special_tokens=specials).converted()
    finally:
        os.unlink(tiktoken_file)
    assert tok.token_to_id("<|return|>") == EOS_ID
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path


def _write_tokenizer(out: Path) -> None:
    shutil.copyfile(o200k_tokenizer_json(), out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token_name(BOS_ID),
        "eos_token": special_token_name(EOS_ID),
        "pad_token": special_token_name(PAD_ID),
        "model_max_length": 1000000000000000019884624838656,
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def config_dict(*, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int,
                n_expert: int, n_expert_used: int, n_ff: int, vocab_size: int, dtype: str,
                mxfp4: bool) -> dict:
    """config.json in the key layout of the published openai/gpt-oss checkpoints."""
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "experts_per_token": n_expert_used,
        "num_experts_per_tok": n_expert_used,
        "num_local_experts": n_expert,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initial_context_length": 64,
        "initializer_range": 0.02,
        "intermediate_size": n_ff,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)],
        "max_position_embeddings": 2048,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_head_kv,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 64, "rope_type": "yarn",
                         "truncate": False},
        "rope_theta": 150000.0,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "sliding_window": 8,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if mxfp4:
        cfg["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
        }
    return cfg


def _random_mxfp4(rng: np.random.Generator, n_expert: int, rows: int, cols: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Random (blocks, scales) in the OpenAI/HF layout: blocks (E, rows, cols/32, 16) u8 with
    element 2i in the low nibble and 2i+1 in the high nibble of byte i; scales (E, rows, cols/32)
    u8 E8M0 (value = code * 2^(scale - 127)), kept near 2^-7 so activations stay O(1)."""
    blocks = rng.integers(0, 256, size=(n_expert, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(116, 123, size=(n_expert, rows, cols // 32), dtype=np.uint8)
    return blocks, scales


def dequantize_hf_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(E, rows, G, 16) blocks + (E, rows, G) scales -> float32 (E, cols=G*32, rows): the HF
    parameter layout (input dim first, as `gate_up_proj` / `down_proj` are stored unquantized)."""
    lo = FP4_VALUES[blocks & 0x0F]
    hi = FP4_VALUES[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    e, rows = blocks.shape[:2]
    return np.ascontiguousarray(vals.reshape(e, rows, -1).transpose(0, 2, 1)).astype(np.float32)


def make_hf_gptoss(out_dir: str | os.PathLike, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                   n_head: int = 4, n_head_kv: int = 2, head_dim: int = 32, n_expert: int = 4,
                   n_expert_used: int = 2, n_ff: int = 64, vocab_size: int = VOCAB_SIZE,
                   dtype: str = "float32", mxfp4: bool = False, tokenizer: bool = True) -> dict:
    """Write a random GptOssForCausalLM checkpoint folder and return its config dict.

    Files: config.json, model.safetensors, and (tokenizer=True, which needs vocab_size 201088)
    tokenizer.json, tokenizer_config.json, chat_template.jinja. Every tensor is random and
    non-zero: norms near 1, sinks ~N(0,1), all biases ~N(0, 0.1). `dtype` ("float32" | "bfloat16")
    is the storage type of the non-MXFP4 tensors. mxfp4=True stores the experts as the published
    checkpoints do: `model.layers.N.mlp.experts.{gate_up_proj,down_proj}_{blocks,scales}` (uint8;
    gate_up rows interleaved gate/up by output row) and float biases; otherwise experts are plain
    `gate_up_proj` (E, n_embd, 2*n_ff) / `down_proj` (E, n_ff, n_embd) tensors, the layout a
    dequantized (bf16) checkpoint has. n_embd and n_ff must be multiples of 32.
    """
    import torch
    from safetensors.torch import save_file

    if n_embd % 32 or n_ff % 32:
        raise ValueError("n_embd and n_ff must be multiples of 32 (MXFP4/Q8_0 block size)")
    if tokenizer and vocab_size != VOCAB_SIZE:
        raise ValueError(f"the o200k tokenizer needs vocab_size={VOCAB_SIZE}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch_dtype)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return t(rng.standard_normal(shape) * std)

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab_size, n_embd, std=1.0),
        "model.norm.weight": t(1.0 + 0.1 * rng.standard_normal(n_embd)),
        "lm_head.weight": normal(vocab_size, n_embd, std=0.1),
    }
    q_out, kv_out = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(1.0 + 0.1 * rng.standard_normal(n_embd))
        sd[p + "post_attention_layernorm.weight"] = t(1.0 + 0.1 * rng.standard_normal(n_embd))
        for name, rows, cols in (("q_proj", q_out, n_embd), ("k_proj", kv_out, n_embd),
                                 ("v_proj", kv_out, n_embd), ("o_proj", n_embd, q_out)):
            sd[p + f"self_attn.{name}.weight"] = normal(rows, cols, std=cols ** -0.5)
            sd[p + f"self_attn.{name}.bias"] = normal(rows, std=0.1)
        sd[p + "self_attn.sinks"] = normal(n_head, std=1.0)
        sd[p + "mlp.router.weight"] = normal(n_expert, n_embd, std=n_embd ** -0.5)
        sd[p + "mlp.router.bias"] = normal(n_expert, std=0.1)
        e = p + "mlp.experts."
        sd[e + "gate_up_proj_bias"] = normal(n_expert, 2 * n_ff, std=0.1)
        sd[e + "down_proj_bias"] = normal(n_expert, n_embd, std=0.1)
        if mxfp4:
            for name, rows, cols in (("gate_up_proj", 2 * n_ff, n_embd), ("down_proj", n_embd, n_ff)):
                blocks, scales = _random_mxfp4(rng, n_expert, rows, cols)
                sd[e + name + "_blocks"] = torch.from_numpy(blocks)
                sd[e + name + "_scales"] = torch.from_numpy(scales)
        else:
            sd[e + "gate_up_proj"] = normal(n_expert, n_embd, 2 * n_ff, std=n_embd ** -0.5)
            sd[e + "down_proj"] = normal(n_expert, n_ff, n_embd, std=n_ff ** -0.5)

    cfg = config_dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                      head_dim=head_dim, n_expert=n_expert, n_expert_used=n_expert_used, n_ff=n_ff,
                      vocab_size=vocab_size, dtype=dtype, mxfp4=mxfp4)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, PAD_ID, 200012], "pad_token_id": PAD_ID}))
    if tokenizer:
        _write_tokenizer(out)
    return cfg


def hf_state_dict_f32(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 numpy arrays in the unquantized HF layout (MXFP4 expert
    `*_blocks`/`*_scales` pairs dequantized to `gate_up_proj` / `down_proj`)."""
    import torch
    from safetensors.torch import load_file

    raw = load_file(str(Path(hf_dir) / "model.safetensors"))
    out: dict[str, np.ndarray] = {}
    for name, ten in raw.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            out[base] = dequantize_hf_mxfp4(ten.numpy(), raw[base + "_scales"].numpy())
        else:
            out[name] = ten.to(torch.float32).numpy()
    return out


def load_hf_gptoss(hf_dir: str | os.PathLike, *, yarn_truncate: bool | None = None
                   ) -> torch.nn.Module:
    """A float32 transformers GptOssForCausalLM (eval mode, eager attention) with the folder's
    weights; MXFP4 experts are dequantized here (transformers' own MXFP4 path wants a GPU).

    yarn_truncate=True rounds the YaRN correction range outward to whole dims, as llama.cpp does
    (the published config says false; see gpt-oss-spec.md §3.4.3): use it to compare with llama.cpp."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if yarn_truncate is not None:
        cfg["rope_scaling"] = dict(cfg["rope_scaling"], truncate=yarn_truncate)
    config = GptOssConfig(**cfg)
    config._attn_implementation = "eager"
    with torch.device("cpu"):
        model = GptOssForCausalLM(config).to(torch.float32)
    sd = {k: torch.from_numpy(v) for k, v in hf_state_dict_f32(hf_dir).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()
