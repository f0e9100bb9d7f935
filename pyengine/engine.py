"""The user-facing model object: a gpt-oss GGUF file, its KV cache, the C forward pass, and the
tokenizer / chat format on top of it. Generation is a loop over pyengine.core's step, the same
core the node drives; results are shaped by pyengine.openai_output.

Argument and method names follow llama-cpp-python's `Llama` (n_ctx, n_threads, n_batch, seed,
verbose, n_gpu_layers; tokenize, detokenize, generate, create_completion, create_chat_completion)
so code written for it reads the same here."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property, partial
from typing import Any

import numpy as np

from pyengine import constrain, cuda
from pyengine._model import DEFAULT_KV_CACHE_TYPE, KVCache, Model, kv_cache_type
from pyengine.chat_template import apply_chat_template
from pyengine.core import Core, Event, Failed, Finished, Request, Sampled, Text
from pyengine.engine_state import EngineState
from pyengine.errors import ContextMemoryError
from pyengine.log import configure, logger
from pyengine.model_file import ModelFile, open_model
from pyengine.openai_output import ChatOutput, TextOutput
from pyengine.repack_cache import repacked_weights
from pyengine.resident import resident_copy
from pyengine.runner import DEFAULT_CHECKPOINT_MIN_STEP, DEFAULT_CHECKPOINTS, Cache, Runner
from pyengine.sampling import LLAMA_CPP_CHAT_TEMPERATURE, LLAMA_CPP_DEFAULTS, SamplingParams
from pyengine.tokenizer import Tokenizer

MAX_DEFAULT_CTX = 131072       # default context cap (128K)
KV_MEMORY_SHARE = 0.5          # default n_ctx keeps the KV cache under this share of free memory


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return max(1, min(len(cores), allowed))
    except OSError:
        pass
    return max(1, allowed)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Engine:
    """A loaded gpt-oss model with one sequence of context.

    model: a GGUF path, a model name in `models_dir`, or an open ModelFile. n_ctx: context length
    (None or 0: the model's trained context, capped at 128K and at what half the free memory holds
    for the KV cache in its types). n_threads: CPU threads (None: physical cores). n_batch: most tokens per
    forward call (longer inputs are split). seed: kept for sampling. verbose: debug log lines.
    device: "cpu" (default), "cuda" or "cuda:N": where the forward pass runs (the CUDA backend needs
    pyengine built with nvcc and an NVIDIA GPU; PYENGINE_CUDA_EMULATOR=1 runs the same kernels in the
    CPU emulator instead). n_gpu_layers (cuda): how many of the last layers run on the GPU (None or
    -1: all; the first ones then run on the CPU, as in llama.cpp); ignored with a warning on the CPU.
    cpu_moe (cuda): keep the expert weights in host memory and run the experts on the CPU, attention
    on the GPU (how gpt-oss-120b fits a small GPU). cuda_graphs (cuda): replay single-token decode
    steps as a captured CUDA graph (default True). seed: the default for sampling calls that give no
    seed of their own (None: a fresh random one). yarn_truncate: round the YaRN correction range to
    whole dimensions as llama.cpp does (default False: the reference/transformers math; the two
    differ noticeably beyond the first few dozen positions, see docs/forward.md). exact: keep every
    CPU product in float32 activations (the reference path). Default False: products of quantized
    weights that have an int8 kernel on this CPU (AVX-512 VNNI) quantize each token's activations to
    8-bit blocks first and use integer dot products, as llama.cpp does (each product moves by ~0.5 %
    relative; the logits stay well inside llama.cpp's own distance from the reference, see
    docs/forward.md). F32/F16/BF16 weights are always exact. cache_type_k, cache_type_v: element
    type of the KV cache's keys and values, "f32", "f16" (default, as llama.cpp), "bf16" or "q8_0"
    (llama-cpp-python's type_k/type_v, llama.cpp's --cache-type-k/v; accuracy against f32 in
    README.md, "KV cache types"). repack: on the CPU with int8 activations, decode the block-quantized
    expert, attention and output weights from their R16 form in a cache file next to the model (built on the first load,
    pyengine/repack_cache.py; the same logits, faster decode); False: always the file's layout.
    `engine.repacked` says whether the cache is in use. use_mmap: keep the weights in the mapped
    files (default True: instant load, small RSS); False on the CPU copies them into anonymous memory
    at load (llama.cpp's --no-mmap: seconds more at load, the weights' size in RSS, and on machines
    where the page cache reads slower than fresh memory a faster decode; pyengine/resident.py).
    ctx_checkpoints: most checkpoints of the sliding-window rings the KV cache keeps (default 8,
    llama-server's --ctx-checkpoints; ~16 MB each for gpt-oss-20b with the f16 cache; 0: none),
    so that a prompt that drops the model's reasoning, edits or repeats an earlier turn is not
    evaluated from the start (pyengine/runner.py Checkpoint). checkpoint_min_step: one more
    checkpoint every this many tokens inside a long prompt (default 4096, llama-server's
    --checkpoint-min-step; 0 or -1: only at prompt ends), so that a prompt that changes one in
    its middle is evaluated from the checkpoint before the change, not from the start."""

    def __init__(self, model: str | os.PathLike | ModelFile, n_ctx: int | None = None,
                 n_threads: int | None = None, n_batch: int = 512, seed: int | None = None,
                 verbose: bool = False, n_gpu_layers: int | None = None,
                 models_dir: str | os.PathLike | None = None, yarn_truncate: bool = False,
                 exact: bool = False, device: str = "cpu", cpu_moe: bool = False,
                 cuda_graphs: bool = True, cache_type_k: str = DEFAULT_KV_CACHE_TYPE,
                 cache_type_v: str = DEFAULT_KV_CACHE_TYPE, repack: bool = True, use_mmap: bool = True,
                 ctx_checkpoints: int = DEFAULT_CHECKPOINTS,
                 checkpoint_min_step: int = DEFAULT_CHECKPOINT_MIN_STEP) -> None:
        configure(verbose)
        self.cache_type_k = kv_cache_type(cache_type_k, "cache_type_k")
        self.cache_type_v = kv_cache_type(cache_type_v, "cache_type_v")
        if n_threads is not None and int(n_threads) < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if int(n_batch) < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_ctx is not None and int(n_ctx) < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
        if int(ctx_checkpoints) < 0:
            raise ValueError(f"ctx_checkpoints must be >= 0, got {ctx_checkpoints}")
        self.ctx_checkpoints = int(ctx_checkpoints)
        if int(checkpoint_min_step) < -1:
            raise ValueError(f"checkpoint_min_step must be >= -1, got {checkpoint_min_step}")
        self.checkpoint_min_step = int(checkpoint_min_step)
        self.model_file = model if isinstance(model, ModelFile) else open_model(model, models_dir)
        self.hparams = self.model_file.hparams
        self.metadata: dict[str, Any] = self.model_file.metadata
        self.n_threads = int(n_threads) if n_threads else physical_cores()
        self.n_batch = int(n_batch)
        self.seed = seed
        self._seeds = np.random.default_rng(seed)
        self._cancel = threading.Event()
        kind, index = cuda.parse_device(device)
        self.device = "cpu" if kind == "cpu" else f"cuda:{index}"
        self.n_gpu_layers = -1 if n_gpu_layers is None else int(n_gpu_layers)
        self.cpu_moe = bool(cpu_moe)
        if kind == "cpu" and self.n_gpu_layers > 0:
            logger.warning("n_gpu_layers=%d ignored: device='cpu' (use device='cuda')", self.n_gpu_layers)
        if kind == "cuda" and self.n_gpu_layers == 0:
            raise ValueError("device='cuda' with n_gpu_layers=0 puts nothing on the GPU: use device='cpu'")
        self.yarn_truncate = bool(yarn_truncate)
        self.exact = bool(exact)
        # the GPU backend uploads the file's layout; exact products do not take the int8 kernels
        use = repack and not self.exact and kind == "cpu"
        repacked = repacked_weights(self.model_file, self.n_threads) if use else {}
        self.repacked = bool(repacked)
        tensors = self.model_file.tensors
        if not use_mmap and kind == "cpu":  # the GPU backend copies the weights to the device anyway
            tensors, repacked = resident_copy(tensors, repacked, available_memory())
        cpu_model = Model(tensors, self.hparams, self.yarn_truncate, not self.exact, repacked)
        if kind == "cuda":
            self._model = cuda.shared_model(self.model_file, cpu_model, self.hparams, self.n_gpu_layers,
                                            self.cpu_moe, self.n_batch, cuda_graphs, index)
        else:
            self._model = cpu_model
        self.n_vocab = int(self._model.n_vocab)
        self.n_ctx = self._choose_n_ctx(n_ctx)
        cache = cuda.backend().CudaKVCache if kind == "cuda" else KVCache
        self.runner = Runner(self._model, self.n_threads, self.n_batch,
                             partial(cache, type_k=self.cache_type_k, type_v=self.cache_type_v),
                             self.ctx_checkpoints, self.checkpoint_min_step)
        self._cache = self.runner.new_cache(self.n_ctx)
        self.n_prompt_reused = 0  # prompt tokens the last generation took from the KV cache
        logger.debug("device=%s n_ctx=%d n_threads=%d n_batch=%d KV cache %.1f MiB (K %s, V %s)", self.device,
                     self.n_ctx, self.n_threads, self.n_batch, self._cache.nbytes / 2 ** 20, self.cache_type_k,
                     self.cache_type_v)

    def _free_memory(self) -> int | None:
        """Bytes a KV cache may take: MemAvailable, or the GPU's free memory (None: unknown)."""
        return cuda.backend().mem_info()[0] if self.device != "cpu" else available_memory()

    def check_kv_fits(self, n_ctx: int, n_caches: int = 1, held: int = 0) -> None:
        """ContextMemoryError when n_caches KV caches of n_ctx positions exceed the free memory plus
        `held` (bytes of those caches already taken from it): refused up front, not by an allocation
        that fails or, where memory is overcommitted, an OOM kill."""
        per_pos, fixed = self._kv_bytes(n_ctx)
        need, free = n_caches * (per_pos * n_ctx + fixed), self._free_memory()
        if free is None:  # unknown: no check
            return
        free += held
        if need > free:
            caches = f"{n_caches} KV caches of n_ctx={n_ctx} need" if n_caches > 1 else f"n_ctx={n_ctx} needs"
            raise ContextMemoryError(f"{caches} {need / 2 ** 30:.1f} GiB of KV cache and "
                                     f"{free / 2 ** 30:.1f} GiB is available: use a smaller context "
                                     f"(or a q8_0 KV cache, half the size of f16)")

    def _kv_bytes(self, n_ctx: int | None = None) -> tuple[int, int]:
        """(bytes per context position, fixed bytes) of one KV cache of this engine. On the CPU the
        fixed part counts the copies of the sliding rings its checkpoints may hold (ctx_checkpoints;
        none where the rings do not wrap in n_ctx): they take the same memory. A CUDA cache's
        checkpoints live in host memory, not in the device memory checked here."""
        per_pos, rings = self._model.kv_bytes_per_token(self.n_batch, self.cache_type_k, self.cache_type_v)
        wraps = n_ctx is None or n_ctx > self.hparams.sliding_window + self.n_batch
        copies = self.ctx_checkpoints if self.device == "cpu" and wraps else 0
        return per_pos, rings * (1 + copies)

    def check_slots_fit(self, n_slots: int) -> None:
        """ContextMemoryError unless n_slots KV caches of this engine's n_ctx fit, its own cache
        being the first: on a GPU that one is already allocated (counted back into the free
        memory); on the CPU its pages come from calloc, so MemAvailable does not count it yet."""
        self.check_kv_fits(self.n_ctx, n_slots, held=self._cache.nbytes if self.device != "cpu" else 0)

    def _choose_n_ctx(self, n_ctx: int | None) -> int:
        trained = int(self.hparams.n_ctx_train)
        if n_ctx:
            if n_ctx > trained:
                logger.warning("n_ctx=%d is larger than the model's trained context %d", n_ctx, trained)
            self.check_kv_fits(int(n_ctx))
            return int(n_ctx)
        per_pos, fixed = self._kv_bytes()
        free = self._free_memory()
        n = min(trained, MAX_DEFAULT_CTX)
        if free is not None and per_pos:
            fits = int((free * KV_MEMORY_SHARE - fixed) // per_pos)
            if fits < n:
                logger.warning("n_ctx capped at %d (of %d) to fit the KV cache in memory", max(fits, 1), n)
                n = max(fits, min(n, 512), 1)
        return n

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache."""
        return self._cache.n_past

    def reset(self) -> None:
        """Empty the KV cache."""
        self._cache.reset()

    def eval(self, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
        """Append tokens after n_past; return the last token's logits (n_vocab,), or every new
        token's logits (len(tokens), n_vocab) when logits_all."""
        return self.runner.eval([self._cache], [tokens], logits_all)[0]

    @property
    def expert_counts(self) -> np.ndarray:
        """int64 (n_layer, n_expert): how often each expert was routed a token by this engine's
        forward passes."""
        return self.runner.expert_counts

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 (len(tokens), n_vocab): every position's logits, in a fresh context."""
        self.reset()
        return self.eval(tokens, logits_all=True)

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (prefix reuse). When the sliding-window rings no longer
        hold the keys position n needs, the prefix is recomputed."""
        self.runner.truncate(self._cache, n)

    def save_state(self) -> EngineState:
        """A copy of the KV cache's contents: the tokens it holds and the K/V rows they wrote
        (llama-cpp-python's Llama.save_state). load_state puts it back, so a prompt evaluated once
        can be continued later, after other prompts, without evaluating it again. It pickles, and
        EngineState.save writes it to a file. On CUDA the rows are downloaded (and uploaded by
        load_state); a state loads only into an engine whose cache keeps rows the same way (the
        same device kind and layer split, and on the CPU the same SIMD level's key tiles)."""
        return self.cache_state(self._cache)

    def load_state(self, state: EngineState) -> None:
        """Make the KV cache hold what it held at save_state (the next generation reuses it as a
        cached prefix). ValueError for a state of another model or KV cache type, or one that does
        not fit this engine's context (nothing is changed then)."""
        self.restore_cache(self._cache, state)

    def cache_state(self, cache: Cache) -> EngineState:
        """save_state of any cache of this engine's model (the node's slots: POST /slots/{id})."""
        rows = self.runner.used_rows(cache)
        if rows is None:
            raise NotImplementedError("this KV cache has no rows to save")
        return EngineState(list(cache.tokens), [r.copy() if r.base is not None else r for r in rows],
                           self._state_key(cache), cache.checkpoints)

    def restore_cache(self, cache: Cache, state: EngineState) -> None:
        """load_state into any cache of this engine's model."""
        if not isinstance(state, EngineState):
            raise TypeError(f"load_state takes an EngineState, not {type(state).__name__}")
        key = self._state_key(cache)
        # states written before keys carried the row format (CPU caches only) read as this CPU's, as then
        if state.key != key and not (state.key == key[:-1] and key[-1][0] == "cpu"):
            raise ValueError("this state was saved by an engine with another model or KV cache type, "
                             "or one that keeps the cache's rows another way (device, layer split, CPU level)")
        if not self.runner.write_rows(cache, state.rows, state.tokens, state.checkpoints):
            raise ValueError(f"this state ({len(state.tokens)} tokens) does not fit this KV cache "
                             f"(n_ctx={cache.n_ctx}, n_batch={self.n_batch})")

    def _state_key(self, cache: Cache) -> tuple:
        """What a saved state must match: the model file (name, size), its cache layout, the K/V
        types and how the cache keeps its rows (KVCache / CudaKVCache.row_format)."""
        return (os.path.basename(self.model_file.path), self.model_file.file_size, cache.native.layout,
                self.cache_type_k, self.cache_type_v, cache.native.row_format)

    # --- text, chat format and generation -------------------------------------------------

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The file's own o200k tokenizer (built on first use)."""
        return Tokenizer.from_metadata(self.metadata)

    @cached_property
    def core(self) -> Core:
        """The generation core over this engine's model (the node drives the same class)."""
        return Core(self.runner, self.tokenizer)

    def tokenize(self, text: str | bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of text; special=True turns control-token spellings into control tokens."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, tokens: Iterable[int], skip_special: bool = False) -> str:
        """Text of token ids (control tokens spelled out unless skip_special)."""
        return self.tokenizer.decode([int(t) for t in tokens], skip_special=skip_special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            tools: Iterable[Mapping[str, Any]] | None = None,
                            reasoning_effort: str = "medium", current_date: str | None = None,
                            add_generation_prompt: bool = True, chat_template: str | None = None) -> list[int]:
        """Prompt token ids for OpenAI-style messages: the built-in harmony renderer (token for
        token what openai-harmony renders), or chat_template="gguf" for the file's own jinja
        template (sandboxed), or a jinja template's text."""
        return apply_chat_template(self.tokenizer, self.metadata, messages, tools, reasoning_effort,
                                   current_date, add_generation_prompt, chat_template)

    def cancel(self) -> None:
        """Ask a running generate/create_* call (in another thread) to stop after the current
        token or prompt chunk; its last event / chunk has finish_reason "stop"."""
        self._cancel.set()

    def _params(self, seed: int | None, **given: Any) -> SamplingParams:
        bias = {int(k): float(v) for k, v in (given.pop("logit_bias") or {}).items()}
        seed = int(seed) if seed is not None else int(self._seeds.integers(2 ** 63))
        return SamplingParams(logit_bias=bias, seed=seed, **given)

    def run(self, req: Request) -> Iterator[list[Event]]:
        """Each step's events of one generation on this engine's cache (a loop over
        Core.step([seq])), until Finished or Failed. The request is checked (ValueError) before
        anything is evaluated; cancel() ends it after the current step."""
        self._cancel.clear()
        seq = self.core.start(self._cache, req)
        self.n_prompt_reused = seq.n_cached

        def steps() -> Iterator[list[Event]]:
            while not seq.done:
                if self._cancel.is_set():
                    seq.cancel()
                (events,) = self.core.step([seq])
                yield events

        return steps()

    def generate(self, tokens: Sequence[int], max_tokens: int | None = None,
                 temperature: float = LLAMA_CPP_DEFAULTS["temperature"], top_k: int = LLAMA_CPP_DEFAULTS["top_k"],
                 top_p: float = LLAMA_CPP_DEFAULTS["top_p"], min_p: float = LLAMA_CPP_DEFAULTS["min_p"],
                 repeat_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Mapping[int | str, float] | None = None, seed: int | None = None,
                 stop: str | Iterable[str] | None = None, logprobs: int | None = None,
                 stop_token_ids: Iterable[int] | None = None) -> Iterator[TokenEvent]:
        """The token-streaming loop: TokenEvents (id, text, logprob, top_logprobs, finish_reason)
        after the prompt tokens, until an end-of-generation token, a stop string, max_tokens, the
        context end or cancel(). temperature <= 0 is greedy. The KV cache keeps the longest
        common prefix with the previous call's tokens (a chat that grew by a turn evaluates only
        the new turn). Bad arguments raise ValueError before any token is evaluated."""
        params = self._params(seed, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                              presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                              logit_bias=logit_bias)
        req = Request(list(tokens), params, max_tokens if max_tokens and max_tokens > 0 else None,
                      [stop] if isinstance(stop, str) else list(stop or []), logprobs,
                      stop_token_ids=stop_token_ids)
        return _token_events(self.run(req))

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16,
                          temperature: float = LLAMA_CPP_DEFAULTS["temperature"],
                          top_p: float = LLAMA_CPP_DEFAULTS["top_p"], min_p: float = LLAMA_CPP_DEFAULTS["min_p"],
                          top_k: int = LLAMA_CPP_DEFAULTS["top_k"], repeat_penalty: float = 1.0,
                          presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                          logit_bias: Mapping[int | str, float] | None = None,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          logprobs: int | None = None, echo: bool = False, stream: bool = False,
                          response_format: Mapping[str, Any] | None = None, grammar: Any = None
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A plain-text completion shaped like llama-cpp-python's (an OpenAI `text_completion`);
        stream=True gives an iterator of chunks. The non-stream result also carries `tokens`, the
        generated token ids. A string prompt is tokenized with control tokens recognised. echo
        with logprobs gives the prompt tokens' logprobs too. response_format ({"type":
        "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) or grammar (GBNF
        text, or a llama_cpp.LlamaGrammar) constrains the text by a token mask (ValueError for an
        invalid one)."""
        spec = constrain.request_spec(self.tokenizer, response_format=response_format, grammar=grammar)
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenize(prompt, special=True)
        else:
            ids = [int(t) for t in prompt]
            text = self.detokenize(ids)
        params = self._params(seed, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                              presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                              logit_bias=logit_bias)
        req = Request(ids, params, max_tokens if max_tokens and max_tokens > 0 else None,
                      [stop] if isinstance(stop, str) else list(stop or []), logprobs,
                      prompt_logprobs=echo and logprobs is not None, constraint=spec)
        steps = self.run(req)
        out = TextOutput(self.tokenizer, str(self.model_file.path), text, echo, logprobs is not None)
        if stream:
            return _stream(out, steps, out.head())
        fin = _drain(out, steps)
        return {**out.result(fin), "tokens": out.tokens}

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]],
                               tools: Sequence[Mapping[str, Any]] | None = None,
                               tool_choice: str | Mapping[str, Any] | None = None,
                               temperature: float = LLAMA_CPP_CHAT_TEMPERATURE,
                               top_p: float = LLAMA_CPP_DEFAULTS["top_p"], top_k: int = LLAMA_CPP_DEFAULTS["top_k"],
                               min_p: float = LLAMA_CPP_DEFAULTS["min_p"], stream: bool = False,
                               stop: str | list[str] | None = None,
                               seed: int | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, logit_bias: Mapping[int | str, float] | None = None,
                               logprobs: bool = False, top_logprobs: int | None = None,
                               reasoning_effort: str = "medium", current_date: str | None = None,
                               chat_template: str | None = None, response_format: Mapping[str, Any] | None = None,
                               grammar: Any = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A chat completion shaped like llama-cpp-python's (OpenAI `chat.completion`, or
        `chat.completion.chunk`s with stream=True), with gpt-oss's `reasoning_content` and
        `tool_calls` parsed from the harmony output; finish_reason is stop, length or tool_calls.
        tool_choice="none" leaves the tools out of the prompt, "auto" (or None) lets the model
        decide, "required" or {"type": "function", "function": {"name": ...}} makes the reply such
        a call. response_format ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"schema": ...}}) or grammar (GBNF text or a llama_cpp.LlamaGrammar) constrains the
        answer. Both are enforced by a token mask on the answer and the call's arguments (never on
        the reasoning); an invalid schema or grammar raises ValueError."""
        spec = constrain.request_spec(self.tokenizer, response_format=response_format, grammar=grammar,
                                      tools=tools, tool_choice=tool_choice)
        if tool_choice == "none":
            tools = None
        prompt = self.apply_chat_template(messages, tools, reasoning_effort, current_date, True, chat_template)
        params = self._params(seed, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                              presence_penalty=float(presence_penalty), frequency_penalty=float(frequency_penalty),
                              logit_bias=logit_bias)
        req = Request(prompt, params, max_tokens if max_tokens and max_tokens > 0 else None,
                      [stop] if isinstance(stop, str) else list(stop or []),
                      (top_logprobs or 0) if logprobs else None, chat=True, constraint=spec)
        steps = self.run(req)
        out = ChatOutput(self.tokenizer, str(self.model_file.path), bool(logprobs))
        if stream:
            return _stream(out, steps, out.head())
        return out.result(_drain(out, steps))


@dataclass
class TokenEvent:
    """One generated token of Engine.generate. text is what it releases (may be empty: held back
    or incomplete UTF-8); the last event carries finish_reason "stop", "length" or "tool_calls"."""

    id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


def _token_events(steps: Iterator[list[Event]]) -> Iterator[TokenEvent]:
    """Engine.generate's view of the steps: one TokenEvent per generated token."""
    for events in steps:
        token = next((e for e in events if isinstance(e, Sampled)), None)
        fin = next((e for e in events if isinstance(e, Finished)), None)
        _raise_failure(events)
        if token is not None:
            text = "".join(e.text for e in events if isinstance(e, Text))
            yield TokenEvent(token.id, text, token.logprob, token.top, fin.reason if fin else None)


def _raise_failure(events: list[Event]) -> None:
    failed = next((e for e in events if isinstance(e, Failed)), None)
    if failed is not None:
        raise RuntimeError(failed.message)


def _drain(out: ChatOutput | TextOutput, steps: Iterator[list[Event]]) -> Finished:
    for events in steps:
        _raise_failure(events)
        out.chunk(events)
        fin = next((e for e in events if isinstance(e, Finished)), None)
        if fin is not None:
            return fin
    raise AssertionError("a sequence ended without Finished")


def _stream(out: ChatOutput | TextOutput, steps: Iterator[list[Event]],
            head: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    def chunks() -> Iterator[dict[str, Any]]:
        if head is not None:
            yield head
        for events in steps:
            _raise_failure(events)
            chunk = out.chunk(events)
            if chunk is not None:
                yield chunk
            fin = next((e for e in events if isinstance(e, Finished)), None)
            if fin is not None:
                yield from out.tail(fin)
                return
    return chunks()
