"""The user-facing model object: a gpt-oss GGUF file, its KV cache, the C forward pass, and the
tokenizer / chat format / generate loop on top of it.

Argument and method names follow llama-cpp-python's `Llama` (n_ctx, n_threads, n_batch, seed,
verbose, n_gpu_layers; tokenize, detokenize, generate, create_completion, create_chat_completion)
so code written for it reads the same here."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np

from pyengine import completions, cuda
from pyengine._model import KVCache, Model
from pyengine.chat_template import apply_chat_template
from pyengine.generate import Generator, TokenEvent
from pyengine.log import configure, logger
from pyengine.model_file import ModelFile, open_model
from pyengine.sampling import SamplingParams
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
    for the f32 KV cache). n_threads: CPU threads (None: physical cores). n_batch: most tokens per
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
    docs/forward.md). F32/F16/BF16 weights are always exact."""

    def __init__(self, model: str | os.PathLike | ModelFile, n_ctx: int | None = None,
                 n_threads: int | None = None, n_batch: int = 512, seed: int | None = None,
                 verbose: bool = False, n_gpu_layers: int | None = None,
                 models_dir: str | os.PathLike | None = None, yarn_truncate: bool = False,
                 exact: bool = False, device: str = "cpu", cpu_moe: bool = False,
                 cuda_graphs: bool = True) -> None:
        configure(verbose)
        if n_threads is not None and int(n_threads) < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if int(n_batch) < 1:
            raise ValueError(f"n_batch must be >= 1, got {n_batch}")
        if n_ctx is not None and int(n_ctx) < 0:
            raise ValueError(f"n_ctx must be >= 0, got {n_ctx}")
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
        cpu_model = Model(self.model_file.tensors, self.hparams, self.yarn_truncate, not self.exact)
        if kind == "cuda":
            self._model = cuda.shared_model(self.model_file, cpu_model, self.hparams, self.n_gpu_layers,
                                            self.cpu_moe, self.n_batch, cuda_graphs, index)
        else:
            self._model = cpu_model
        self.n_vocab = int(self._model.n_vocab)
        self.n_ctx = self._choose_n_ctx(n_ctx)
        cache = cuda.backend().CudaKVCache if kind == "cuda" else KVCache
        self._cache = cache(self._model, self.n_ctx, self.n_batch)
        self._tokens: list[int] = []
        logger.debug("device=%s n_ctx=%d n_threads=%d n_batch=%d KV cache %.1f MiB (f32)", self.device,
                     self.n_ctx, self.n_threads, self.n_batch, self._cache.nbytes / 2 ** 20)

    def _choose_n_ctx(self, n_ctx: int | None) -> int:
        trained = int(self.hparams.n_ctx_train)
        if n_ctx:
            if n_ctx > trained:
                logger.warning("n_ctx=%d is larger than the model's trained context %d", n_ctx, trained)
            return int(n_ctx)
        per_pos, fixed = self._model.kv_bytes_per_token(self.n_batch)
        n = min(trained, MAX_DEFAULT_CTX)
        free = cuda.backend().mem_info()[0] if self.device != "cpu" else available_memory()
        if free is not None and per_pos:
            fits = int((free * KV_MEMORY_SHARE - fixed) // per_pos)
            if fits < n:
                logger.warning("n_ctx capped at %d (of %d) to fit the KV cache in memory", max(fits, 1), n)
                n = max(fits, min(n, 512), 1)
        return n

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache."""
        return len(self._tokens)

    def reset(self) -> None:
        """Empty the KV cache."""
        self._tokens = []

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError("tokens must be a 1-D sequence of integer token ids")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            bad = int(arr[(arr < 0) | (arr >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.n_vocab}")
        if self.n_past + arr.size > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {arr.size} new tokens exceed the context "
                             f"window n_ctx={self.n_ctx}")
        return arr.astype(np.int32)

    def eval(self, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
        """Append tokens after n_past; return the last token's logits (n_vocab,), or every new
        token's logits (len(tokens), n_vocab) when logits_all."""
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise ValueError("eval needs at least one token")
        step = min(self.n_batch, self._cache.max_batch(self._model.window))
        outs = []
        for start in range(0, arr.size, step):
            chunk = arr[start:start + step]
            last = start + step >= arr.size
            out = self._model.forward(self._cache, chunk, self.n_past, logits_all, self.n_threads)
            self._tokens.extend(int(t) for t in chunk)
            if logits_all or last:
                outs.append(out)
        return np.concatenate(outs) if logits_all else outs[-1]

    @property
    def expert_counts(self) -> np.ndarray:
        """int64 (n_layer, n_expert): how often each expert was routed a token by this engine's
        forward passes (including the eval_batch calls it led)."""
        return self._model.expert_counts

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 (len(tokens), n_vocab): every position's logits, in a fresh context."""
        self.reset()
        return self.eval(tokens, logits_all=True)

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (prefix reuse). When the sliding-window rings no longer
        hold the keys position n needs, the prefix is recomputed."""
        if not 0 <= n <= self.n_past:
            raise ValueError(f"truncate({n}): must be between 0 and n_past={self.n_past}")
        keep = self._tokens[:n]
        if self.n_past - n <= self._cache.max_batch(self._model.window):
            self._tokens = keep
            return
        self.reset()
        if keep:
            self.eval(keep)

    # --- text, chat format and generation -------------------------------------------------

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The file's own o200k tokenizer (built on first use)."""
        return Tokenizer.from_metadata(self.metadata)

    @cached_property
    def _generator(self) -> Generator:
        return Generator(self, self.tokenizer)

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

    @property
    def n_prompt_reused(self) -> int:
        """Prompt tokens the last generate call took from the KV cache instead of evaluating."""
        return self._generator.n_prompt_reused

    def cancel(self) -> None:
        """Ask a running generate/create_* call (in another thread) to stop after the current
        token or prompt chunk; its last event / chunk has finish_reason "stop"."""
        self._cancel.set()

    def generate(self, tokens: Sequence[int], max_tokens: int | None = None, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Mapping[int | str, float] | None = None, seed: int | None = None,
                 stop: str | Iterable[str] | None = None, logprobs: int | None = None,
                 stop_token_ids: Iterable[int] | None = None) -> Iterator[TokenEvent]:
        """The token-streaming loop: TokenEvents (id, text, logprob, top_logprobs, finish_reason)
        after the prompt tokens, until an end-of-generation token, a stop string, max_tokens, the
        context end or cancel(). temperature <= 0 is greedy. The KV cache keeps the longest
        common prefix with the previous call's tokens (a chat that grew by a turn evaluates only
        the new turn). Bad arguments raise ValueError before any token is evaluated."""
        params = SamplingParams(
            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
            repeat_penalty=float(repeat_penalty), presence_penalty=float(presence_penalty),
            frequency_penalty=float(frequency_penalty),
            logit_bias={int(k): float(v) for k, v in (logit_bias or {}).items()},
            seed=int(seed) if seed is not None else int(self._seeds.integers(2 ** 63)))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._cancel.clear()
        return self._generator.generate(tokens, max_tokens if max_tokens and max_tokens > 0 else None,
                                        params, stops, logprobs, stop_token_ids, self._cancel.is_set)

    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          top_k: int = 40, repeat_penalty: float = 1.0, presence_penalty: float = 0.0,
                          frequency_penalty: float = 0.0, logit_bias: Mapping[int | str, float] | None = None,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          logprobs: int | None = None, echo: bool = False, stream: bool = False
                          ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A plain-text completion shaped like llama-cpp-python's (an OpenAI `text_completion`);
        stream=True gives an iterator of chunks. The non-stream result also carries `tokens`, the
        generated token ids. A string prompt is tokenized with control tokens recognised."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenize(prompt, special=True)
        else:
            ids = [int(t) for t in prompt]
            text = self.detokenize(ids)
        events = self.generate(ids, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                               presence_penalty, frequency_penalty, logit_bias, seed, stop, logprobs)
        return completions.completion(events, self.tokenizer, str(self.model_file.path), ids, text, echo,
                                      logprobs is not None, stream)

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]],
                               tools: Sequence[Mapping[str, Any]] | None = None,
                               tool_choice: str | Mapping[str, Any] | None = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, stream: bool = False, stop: str | list[str] | None = None,
                               seed: int | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, logit_bias: Mapping[int | str, float] | None = None,
                               logprobs: bool = False, top_logprobs: int | None = None,
                               reasoning_effort: str = "medium", current_date: str | None = None,
                               chat_template: str | None = None) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A chat completion shaped like llama-cpp-python's (OpenAI `chat.completion`, or
        `chat.completion.chunk`s with stream=True), with gpt-oss's `reasoning_content` and
        `tool_calls` parsed from the harmony output; finish_reason is stop, length or tool_calls.
        tool_choice="none" leaves the tools out of the prompt; other values are accepted but not
        enforced (the model decides)."""
        if tool_choice == "none":
            tools = None
        prompt = self.apply_chat_template(messages, tools, reasoning_effort, current_date, True, chat_template)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        events = self.generate(prompt, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                               presence_penalty, frequency_penalty, logit_bias, seed, None,
                               (top_logprobs or 0) if logprobs else None)
        return completions.chat_completion(events, self.tokenizer, str(self.model_file.path), prompt, stops,
                                           logprobs, stream)


def eval_batch(engines: Sequence[Engine], tokens: Sequence[Sequence[int]],
               n_threads: int | None = None) -> list[np.ndarray]:
    """Engine.eval for several sequences at once: tokens[i] are appended to engines[i]'s cache in
    one forward pass per round, so every weight matrix is read once for all sequences (continuous
    batching of decode steps; prompt chunks may ride along). The engines must be distinct and
    share one ModelFile (and yarn_truncate and exact); the first one's model runs the pass and counts the
    expert selections. Returns each sequence's last-token logits (n_vocab,). Inputs longer than an
    engine's n_batch take several rounds. All inputs are checked before anything is evaluated."""
    engines = list(engines)
    if not engines or len(tokens) != len(engines):
        raise ValueError("eval_batch needs one token list per engine, and at least one engine")
    if len({id(e) for e in engines}) != len(engines):
        raise ValueError("eval_batch: an engine appears twice")
    lead = engines[0]
    if any(e.model_file is not lead.model_file or e.device != lead.device or e.yarn_truncate != lead.yarn_truncate
           or e.exact != lead.exact
           or (e.device != "cpu" and e._model is not lead._model) for e in engines):
        raise ValueError("eval_batch: the engines must share one ModelFile, device, yarn_truncate and "
                         "exact (and, on a GPU, one uploaded model)")
    threads = int(n_threads) if n_threads is not None else lead.n_threads
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    arrays = [e._check_tokens(t) for e, t in zip(engines, tokens)]
    if any(a.size == 0 for a in arrays):
        raise ValueError("eval needs at least one token")
    chunks = []
    for e, a in zip(engines, arrays):
        step = min(e.n_batch, e._cache.max_batch(e._model.window))
        chunks.append([a[i:i + step] for i in range(0, a.size, step)])
    last: list[np.ndarray] = [np.empty(0, np.float32)] * len(engines)
    for r in range(max(len(c) for c in chunks)):
        live = [i for i, c in enumerate(chunks) if r < len(c)]
        out = lead._model.forward_seqs([engines[i]._cache for i in live], [chunks[i][r] for i in live],
                                       [engines[i].n_past for i in live], False, threads)
        for row, i in zip(out, live):
            engines[i]._tokens.extend(int(t) for t in chunks[i][r])
            last[i] = row
    return last
