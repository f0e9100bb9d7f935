"""A UNIT-TEST DOUBLE for the model under pyengine.core: a Runner whose "forward pass" returns
logits that make a scripted completion the only likely continuation.

Everything else is the real code: the core's sequences, sampler, token-id Harmony parser, stop
matcher and logprobs, pyengine.openai_output, and (for the node) the scheduler and HTTP layer. The
script is a function from the decoded prompt to the completion text (control tokens spelled out),
tokenized with control tokens recognised. The scripted token gets logit 0, the next id -50, every
other id about -1e4 (fixed noise, so top-k does not meet a vocabulary of ties), and the other
tokens of the last REPEAT_WINDOW positions -inf in the rows a token is drawn from (so that no
repetition penalty, however extreme, can lift them to the script's level): whatever the sampling parameters, the script is what is
drawn, and its logprob is ~0 with one visible alternative."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pyengine.core import Core, Request, Sequence
from pyengine.runner import Cache, Runner
from pyengine.tokenizer import Tokenizer

ENDOFTEXT = 199999
REPEAT_WINDOW = 64  # the sampler's penalty window (SamplingParams.repeat_last_n)


class Unbounded:
    """The native cache of a model without sliding windows: one call may add any number of tokens."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx

    def max_batch(self, window: int) -> int:
        return self.n_ctx

    def ring_copies(self) -> tuple:
        return ()  # no sliding rings: nothing to checkpoint

    def used_rows(self, n_past: int) -> None:
        return None  # no K/V rows to copy (the prompt cache, state files and n > 1 sharing skip it)

    def row_shapes(self, n_past: int) -> None:
        return None


class _Model:
    def __init__(self, n_vocab: int, n_layer: int = 2, n_expert: int = 4) -> None:
        self.n_vocab = n_vocab
        self.window = 0
        self.counts = np.zeros((n_layer, n_expert), dtype=np.int64)

    @property
    def expert_counts(self) -> np.ndarray:
        return self.counts.copy()


class ScriptedRunner(Runner):
    """`delay` seconds per forward pass emulate compute; `n_batch` prompt tokens per step;
    `sizes` records how many sequences each pass carried."""

    def __init__(self, n_vocab: int, n_batch: int = 64, delay: float = 0.0) -> None:
        super().__init__(_Model(n_vocab), n_threads=1, n_batch=n_batch)
        self.delay = delay
        self.background = (np.random.default_rng(0).standard_normal(n_vocab) - 1e4).astype(np.float32)
        self.scripts: dict[int, tuple[int, list[int], bool]] = {}  # id(cache) -> (prompt length, output, fail)
        self.sizes: list[int] = []

    def new_cache(self, n_ctx: int) -> Cache:
        return Cache(Unbounded(n_ctx), n_ctx)

    def _forward(self, caches: list[Cache], chunks: list[np.ndarray], logits_all: bool) -> np.ndarray:
        time.sleep(self.delay)
        self.sizes.append(len(caches))
        rows = []
        for cache, chunk in zip(caches, chunks):
            n_prompt, output, fail = self.scripts[id(cache)]
            context = cache.tokens + [int(t) for t in chunk]
            ends = range(cache.n_past + 1, cache.n_past + len(chunk) + 1) if logits_all else [cache.n_past + len(chunk)]
            for end in ends:
                k = end - n_prompt  # tokens of the output already in the context
                if fail and k >= 3:
                    raise RuntimeError("scripted failure")
                target = output[k] if 0 <= k < len(output) else ENDOFTEXT
                row = self.background.copy()
                row[target + 1 if target + 1 < self.n_vocab else 0] = -50.0
                if end >= n_prompt:  # a row the next token is drawn from (prompt rows give prompt logprobs)
                    row[context[max(0, end - REPEAT_WINDOW):end]] = -np.inf
                row[target] = 0.0
                rows.append(row)
                self.model.counts[:, target % self.model.counts.shape[1]] += 1
        return np.stack(rows)


class ScriptedCore(Core):
    """Core over a ScriptedRunner: each sequence's output is `script(prompt text)` (a text whose
    control-token spellings are control tokens, or a list of token ids); a prompt that contains
    `fail_word` makes the forward pass raise at its fourth generated token."""

    def __init__(self, runner: ScriptedRunner, tokenizer: Tokenizer, script: Callable[[str], str | list[int]]) -> None:
        super().__init__(runner, tokenizer)
        self.script = script
        self.fail_word = ""

    def start(self, cache: Cache, req: Request) -> Sequence:
        text = self.tokenizer.decode(req.prompt)
        output = self.script(text)
        if isinstance(output, str):
            output = self.tokenizer.encode(output, special=True)
        fail = bool(self.fail_word) and self.fail_word in text
        self.runner.scripts[id(cache)] = (len(req.prompt), output, fail)
        return super().start(cache, req)


def script_engine(eng, script: Callable[[str], str | list[int]]) -> ScriptedCore:
    """Make Engine `eng` (any loaded model) answer `script(prompt text)` through its own
    generate / create_* code: its runner, cache and core are replaced by scripted ones."""
    runner = ScriptedRunner(eng.n_vocab)
    core = ScriptedCore(runner, eng.tokenizer, script)
    eng.runner, eng._cache = runner, runner.new_cache(eng.n_ctx)
    eng.__dict__["core"] = core
    return core
