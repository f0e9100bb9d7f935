"""Convert a Hugging Face gpt-oss checkpoint (bf16/f32, or the published MXFP4 form) to GGUF.

Why here: so a user with an HF download can make the file this engine (or llama.cpp, or Ollama)
runs, without a llama.cpp checkout. What it writes follows llama.cpp's converter and quantizer
(docs/gpt-oss.md) and, for `layout="ollama"`, Ollama's Gen-2 `gptoss` layout
(docs/loader.md):

- names: HF -> llama.cpp (token_embd, blk.N.attn_q, ffn_gate_exps, ...); Ollama Gen-2 renames three
  (attn_output -> attn_out, post_attention_norm -> ffn_norm, attn_sinks.weight -> attn_sinks);
- experts: HF `gate_up_proj` rows/columns alternate gate/up, split into ffn_gate_exps / ffn_up_exps;
  published `*_blocks`/`*_scales` MXFP4 experts are repacked losslessly to ggml's block order;
- types: 1-D tensors, every bias and the router stay F32; experts become MXFP4 when the source is
  MXFP4 or outtype is mxfp4, else the outtype; other matrices take the outtype (Q8_0 for mxfp4,
  like llama.cpp's MXFP4_MOE); a row length that is not a block multiple falls back to F16.

The file is written to a temporary name beside the target and renamed at the end, so an error or
Ctrl-C never leaves a half-written OUT.gguf behind. `write_gguf` is that writer for any source of
HF-named tensors (pyengine.demo_model feeds it random weights).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, quants

from pyengine.errors import ModelLoadError
from pyengine.hf_checkpoint import HFCheckpoint
from pyengine.hf_tokenizer import GGUFTokenizer, read_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "mxfp4")
ARCH_NAMES = ("gptoss", "gpt-oss")
LAYOUTS = ("llama.cpp", "ollama")

_OUT_QTYPE = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "mxfp4": QT.Q8_0}
# general.file_type (llama.cpp's LlamaFileType); 38 = MOSTLY_MXFP4_MOE whenever experts are MXFP4
_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
_FILE_TYPE_MXFP4_MOE = 38

_OLLAMA_NAMES = {"attn_output": "attn_out", "post_attention_norm": "ffn_norm",
                 "attn_sinks.weight": "attn_sinks"}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its file name, type, element shape (outermost first, i.e. reversed
    GGUF ne) and a function producing its float32 values or, for `raw`, its finished bytes."""
    name: str
    qtype: QT
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]
    raw: bool = False

    @property
    def row_bytes(self) -> int:
        block, size = quants.GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.row_bytes


def _encode(values: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 values -> the tensor's bytes (uint8, last axis = row bytes)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == QT.F32:
        data = values
    elif qtype == QT.F16:
        data = values.astype(np.float16)
    else:
        data = quants.quantize(values, qtype)
    return data.view(np.uint8).reshape(*values.shape[:-1], -1)


def repack_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI/HF MXFP4 (blocks [..., 16] u8, scales [...] u8) -> ggml MXFP4 bytes [..., n*17].

    HF byte i holds element 2i (low nibble) and 2i+1 (high nibble); ggml byte j holds element j
    (low) and j+16 (high), after the E8M0 scale byte. Codes and scales are unchanged (lossless)."""
    codes = np.empty(blocks.shape[:-1] + (32,), dtype=np.uint8)
    codes[..., 0::2] = blocks & 0x0F
    codes[..., 1::2] = blocks >> 4
    out = np.empty(blocks.shape[:-1] + (17,), dtype=np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(*blocks.shape[:-2], -1)


@dataclass(frozen=True)
class GptOssConfig:
    """The HF config.json values the GGUF needs, validated."""
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    rms_eps: float
    sliding_window: int
    rope_base: float
    rope_scaling: dict | None
    vocab_size: int

    @classmethod
    def from_hf(cls, cfg: dict) -> GptOssConfig:
        archs = cfg.get("architectures") or []
        if "GptOssForCausalLM" not in archs and cfg.get("model_type") != "gpt_oss":
            raise ModelLoadError(f"not a gpt-oss checkpoint (architectures {archs}, "
                                 f"model_type {cfg.get('model_type')!r})")

        def need(*keys: str) -> int | float:
            for k in keys:
                if k in cfg:
                    return cfg[k]
            raise ModelLoadError(f"config.json has no {keys[0]}")

        # transformers >= 5 saves rope settings as rope_parameters (with rope_theta inside)
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_base = cfg.get("rope_theta", rope.get("rope_theta", 150000.0))
        scaling = rope if rope.get("rope_type", rope.get("type")) == "yarn" else None
        n_layer = int(need("num_hidden_layers"))
        c = cls(n_ctx_train=int(need("max_position_embeddings")), n_embd=int(need("hidden_size")),
                n_layer=n_layer, n_ff=int(need("intermediate_size")),
                n_head=int(need("num_attention_heads")),
                n_head_kv=int(need("num_key_value_heads", "num_attention_heads")),
                head_dim=int(cfg.get("head_dim") or need("hidden_size") // need("num_attention_heads")),
                n_expert=int(need("num_local_experts", "num_experts")),
                n_expert_used=int(need("num_experts_per_tok", "experts_per_token")),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), sliding_window=int(need("sliding_window")),
                rope_base=float(rope_base), rope_scaling=scaling, vocab_size=int(need("vocab_size")))
        if c.n_head % c.n_head_kv or not 0 < c.n_expert_used <= c.n_expert:
            raise ModelLoadError("config.json: heads must divide by KV heads and "
                                 "0 < num_experts_per_tok <= num_local_experts")
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
        if cfg.get("layer_types", expected) != expected:
            raise ModelLoadError("config.json: layer_types must alternate sliding/full starting with "
                                 "sliding (the only pattern gpt-oss GGUF files can express)")
        return c


def _metadata(w: GGUFWriter, c: GptOssConfig, arch: str, layout: str, file_type: int,
              name: str) -> None:
    w.add_type("model")
    w.add_name(name)
    p = arch
    w.add_uint32(f"{p}.block_count", c.n_layer)
    w.add_uint32(f"{p}.context_length", c.n_ctx_train)
    w.add_uint32(f"{p}.embedding_length", c.n_embd)
    w.add_uint32(f"{p}.feed_forward_length", c.n_ff)
    w.add_uint32(f"{p}.attention.head_count", c.n_head)
    w.add_uint32(f"{p}.attention.head_count_kv", c.n_head_kv)
    w.add_float32(f"{p}.rope.freq_base", c.rope_base)
    w.add_float32(f"{p}.attention.layer_norm_rms_epsilon", c.rms_eps)
    w.add_uint32(f"{p}.expert_count", c.n_expert)
    w.add_uint32(f"{p}.expert_used_count", c.n_expert_used)
    w.add_uint32(f"{p}.attention.key_length", c.head_dim)
    w.add_uint32(f"{p}.attention.value_length", c.head_dim)
    w.add_uint32(f"{p}.attention.sliding_window", c.sliding_window)
    ys = c.rope_scaling
    if ys is not None:
        w.add_float32(f"{p}.rope.scaling.factor", float(ys.get("factor", 1.0)))
        w.add_uint32(f"{p}.rope.scaling.original_context_length",
                     int(ys.get("original_max_position_embeddings", c.n_ctx_train)))
    # Ollama's gptoss writer never wrote these (its readers derive or hard-code them)
    if layout == "llama.cpp":
        w.add_uint32(f"{p}.expert_feed_forward_length", c.n_ff)
        if ys is not None:
            w.add_string(f"{p}.rope.scaling.type", "yarn")
            w.add_float32(f"{p}.rope.scaling.yarn_beta_fast", float(ys.get("beta_fast", 32.0)))
            w.add_float32(f"{p}.rope.scaling.yarn_beta_slow", float(ys.get("beta_slow", 1.0)))
    w.add_file_type(file_type)
    w.add_quantization_version(2)


def _tokenizer_metadata(w: GGUFWriter, tok: GGUFTokenizer) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)


class TensorSource(Protocol):
    """HF-named tensors the planner reads: an HFCheckpoint, or generated weights."""

    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def raw(self, name: str) -> np.ndarray: ...
    def float32(self, name: str) -> np.ndarray: ...


class _Planner:
    """Builds the ordered list of output tensors for one checkpoint and option set."""

    def __init__(self, ckpt: TensorSource, c: GptOssConfig, outtype: str, layout: str):
        self.ckpt, self.c, self.outtype, self.layout = ckpt, c, outtype, layout
        self.mxfp4_source = "model.layers.0.mlp.experts.gate_up_proj_blocks" in ckpt

    def _name(self, name: str) -> str:
        if self.layout == "ollama" and name.startswith("blk."):
            blk, n, rest = name.split(".", 2)
            for old, new in _OLLAMA_NAMES.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            name = f"{blk}.{n}.{rest}"
        return name

    def _fit(self, qtype: QT, shape: tuple[int, ...]) -> QT:
        if shape[-1] % quants.GGML_QUANT_SIZES[qtype][0]:
            return QT.F16
        return qtype

    def _float(self, name: str, qtype: QT, shape: tuple[int, ...],
               produce: Callable[[], np.ndarray]) -> PlannedTensor:
        return PlannedTensor(self._name(name), self._fit(qtype, shape), shape, produce)

    def _matrix(self, name: str, hf: str) -> PlannedTensor:
        return self._float(name, _OUT_QTYPE[self.outtype], self.ckpt.shape(hf),
                           lambda: self.ckpt.float32(hf))

    def _f32(self, name: str, hf: str, transform: Callable[[np.ndarray], np.ndarray] = lambda a: a
             ) -> PlannedTensor:
        shape = transform(np.empty(self.ckpt.shape(hf), dtype=np.uint8)).shape
        return PlannedTensor(self._name(name), QT.F32, shape, lambda: transform(self.ckpt.float32(hf)))

    def _experts(self, i: int) -> Iterator[PlannedTensor]:
        e = f"model.layers.{i}.mlp.experts."
        b = f"blk.{i}."
        c = self.c
        if self.mxfp4_source:
            for out, hf, rows in (("ffn_gate_exps", "gate_up_proj", slice(0, None, 2)),
                                  ("ffn_up_exps", "gate_up_proj", slice(1, None, 2)),
                                  ("ffn_down_exps", "down_proj", slice(None))):
                n_out = c.n_ff if hf == "gate_up_proj" else c.n_embd
                n_in = c.n_embd if hf == "gate_up_proj" else c.n_ff
                want = (c.n_expert, 2 * n_out if hf == "gate_up_proj" else n_out, n_in // 32, 16)
                if self.ckpt.shape(e + hf + "_blocks") != want:
                    raise ModelLoadError(f"{e}{hf}_blocks has shape {self.ckpt.shape(e + hf + '_blocks')}"
                                         f", expected {want}")

                def produce(hf: str = hf, rows: slice = rows) -> np.ndarray:
                    return repack_mxfp4(self.ckpt.raw(e + hf + "_blocks")[:, rows],
                                        self.ckpt.raw(e + hf + "_scales")[:, rows])
                yield PlannedTensor(self._name(b + out + ".weight"), QT.MXFP4,
                                    (c.n_expert, n_out, n_in), produce, raw=True)
        else:
            qtype = QT.MXFP4 if self.outtype == "mxfp4" else _OUT_QTYPE[self.outtype]
            gate_up, down = e + "gate_up_proj", e + "down_proj"
            if self.ckpt.shape(gate_up) != (c.n_expert, c.n_embd, 2 * c.n_ff):
                raise ModelLoadError(f"{gate_up} has shape {self.ckpt.shape(gate_up)}, expected "
                                     f"{(c.n_expert, c.n_embd, 2 * c.n_ff)}")
            # HF stores experts input-major (E, in, out); GGUF wants (E, out, in); gate/up alternate
            yield self._float(b + "ffn_gate_exps.weight", qtype, (c.n_expert, c.n_ff, c.n_embd),
                              lambda: self.ckpt.float32(gate_up)[:, :, 0::2].transpose(0, 2, 1))
            yield self._float(b + "ffn_up_exps.weight", qtype, (c.n_expert, c.n_ff, c.n_embd),
                              lambda: self.ckpt.float32(gate_up)[:, :, 1::2].transpose(0, 2, 1))
            yield self._float(b + "ffn_down_exps.weight", qtype, (c.n_expert, c.n_embd, c.n_ff),
                              lambda: self.ckpt.float32(down).transpose(0, 2, 1))
        yield self._f32(b + "ffn_gate_exps.bias", e + "gate_up_proj_bias", lambda a: a[:, 0::2])
        yield self._f32(b + "ffn_up_exps.bias", e + "gate_up_proj_bias", lambda a: a[:, 1::2])
        yield self._f32(b + "ffn_down_exps.bias", e + "down_proj_bias")

    def plan(self) -> list[PlannedTensor]:
        out = [self._matrix("token_embd.weight", "model.embed_tokens.weight")]
        for i in range(self.c.n_layer):
            h, b = f"model.layers.{i}.", f"blk.{i}."
            out.append(self._f32(b + "attn_norm.weight", h + "input_layernorm.weight"))
            for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                               ("o_proj", "attn_output")):
                out.append(self._matrix(b + name + ".weight", h + f"self_attn.{proj}.weight"))
                if h + f"self_attn.{proj}.bias" in self.ckpt:
                    out.append(self._f32(b + name + ".bias", h + f"self_attn.{proj}.bias"))
            out.append(self._f32(b + "attn_sinks.weight", h + "self_attn.sinks"))
            out.append(self._f32(b + "post_attention_norm.weight", h + "post_attention_layernorm.weight"))
            out.append(self._f32(b + "ffn_gate_inp.weight", h + "mlp.router.weight"))
            out.append(self._f32(b + "ffn_gate_inp.bias", h + "mlp.router.bias"))
            out.extend(self._experts(i))
        out.append(self._f32("output_norm.weight", "model.norm.weight"))
        lm_head = "lm_head.weight" if "lm_head.weight" in self.ckpt else "model.embed_tokens.weight"
        out.append(self._matrix("output.weight", lm_head))
        return out

    def file_type(self) -> int:
        if self.mxfp4_source or self.outtype == "mxfp4":
            return _FILE_TYPE_MXFP4_MOE
        return _FILE_TYPE[self.outtype]


ProgressFn = Callable[[int, int, PlannedTensor], None]


def _check_options(outtype: str, arch_name: str, layout: str, out: Path, force: bool) -> None:
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}")
    if arch_name not in ARCH_NAMES:
        raise ValueError(f"arch_name must be one of {ARCH_NAMES}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, *, outtype: str = "bf16",
            arch_name: str = "gptoss", layout: str = "llama.cpp", force: bool = False,
            progress: ProgressFn | None = None) -> Path:
    """Convert the HF gpt-oss checkpoint in `hf_dir` to the GGUF file `out_path`; returns its path.

    outtype: f32 | f16 | bf16 | q8_0 | mxfp4 (see the module docstring for the per-tensor rules).
    arch_name: "gptoss" (canonical) or "gpt-oss" (llama.cpp's spelling; the key prefix follows).
    layout: "llama.cpp" tensor names, or "ollama" (Ollama's Gen-2 gptoss names and key set).
    Raises FileExistsError if out_path exists and not force; ModelLoadError for a bad checkpoint.
    progress(i, n, tensor) is called after each tensor is written."""
    folder, out = Path(hf_dir), Path(out_path)
    _check_options(outtype, arch_name, layout, out, force)
    ckpt = HFCheckpoint(folder)
    try:
        c = GptOssConfig.from_hf(ckpt.config)
        tok = read_tokenizer(folder, c.vocab_size, ckpt.config)
        return write_gguf(ckpt, c, tok, out, outtype=outtype, arch_name=arch_name, layout=layout,
                          name=folder.resolve().name, force=force, progress=progress)
    finally:
        ckpt.close()


def write_gguf(source: TensorSource, c: GptOssConfig, tok: GGUFTokenizer, out_path: str | os.PathLike,
               *, outtype: str, arch_name: str = "gptoss", layout: str = "llama.cpp", name: str,
               force: bool = False, progress: ProgressFn | None = None,
               replan: Callable[[PlannedTensor], PlannedTensor] | None = None,
               file_type: int | None = None) -> Path:
    """Write a gpt-oss GGUF from HF-named tensors in `source` (config `c`, tokenizer `tok`) to
    `out_path` atomically; the options mean what they mean for `convert`. Returns the path.
    replan, if given, may swap each planned tensor for another of the same name and shape
    (pyengine.synth hands in finished bytes instead of floats to quantize, and other types for its
    Q4_K_M-style mix, whose general.file_type it then gives as file_type)."""
    out = Path(out_path)
    _check_options(outtype, arch_name, layout, out, force)
    planner = _Planner(source, c, outtype, layout)
    tensors = planner.plan()
    if replan is not None:
        tensors = [replan(t) for t in tensors]

    fd, tmp_name = tempfile.mkstemp(prefix=f"{out.name}.tmp-", dir=out.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = GGUFWriter(tmp, arch_name)
    try:
        _metadata(writer, c, arch_name, layout, planner.file_type() if file_type is None else file_type, name)
        _tokenizer_metadata(writer, tok)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape[:-1] + (t.row_bytes,), np.dtype(np.uint8),
                                   t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            data = t.produce() if t.raw else _encode(t.produce(), t.qtype)
            if data.nbytes != t.nbytes:
                raise ModelLoadError(f"{t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(np.ascontiguousarray(data))
            if progress is not None:
                progress(i + 1, len(tensors), t)
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it 0600; give it a normal file's mode
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
