"""The one generation core that the library (Engine) and the node both drive.

A `Sequence` owns everything one generation needs: its KV cache (a runner.Cache), the prompt
tokens still to evaluate, the sampler, the detokenizer or the token-id Harmony parser, the stop
matcher and the logprob bookkeeping. `Core.step(sequences)` advances every sequence by one unit
of work (a prompt chunk, or one sampled token) and runs all their evaluations in one batched
forward pass; it returns each sequence's typed events. `Engine.generate` and `create_*` are a
loop over `step([seq])`; the node's scheduler is a loop over `step(active)`; pyengine.openai_output
turns the events into OpenAI objects for both. docs/generation.md has the data flow.

Rules that hold for every caller:
- logprobs describe the model's own distribution (log-softmax of the raw logits, before
  logit_bias and penalties), and each token's entry goes with the text it belongs to: only the
  tokens of the answer (`content`) get entries; reasoning, headers, tool arguments and control
  tokens do not. Entries are released with their text, so with a stop string the entries are those
  of the tokens whose text lies entirely before the cut.
- Stop strings cut the answer the moment they appear, whatever the parser's state (a reply the
  model wrote without a Harmony header included); reasoning and tool arguments are never cut.
- A constraint (pyengine.constrain: response_format, grammar, a required tool call) masks the
  answer, the tool arguments and the headers that lead to them; reasoning is drawn unmasked.
- A control token never reaches a text field of a chat reply; a raw completion spells control
  tokens out (it is the model's text), except the end-of-generation token that ends it."""

from __future__ import annotations

import codecs
import collections
import logging
import math
from collections.abc import Iterable, Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from pyengine.constrain import Constraint, Spec
from pyengine.harmony_stream import Delta, TokenParser
from pyengine.runner import Cache, Runner
from pyengine.sampling import Sampler, SamplingParams, log_softmax, top_logprobs
from pyengine.stops import StopMatcher
from pyengine.tokenizer import Tokenizer

log = logging.getLogger("pyengine")


# --- events ----------------------------------------------------------------------------------


@dataclass
class Sampled:
    """A generated token; logprob and top ((id, logprob) best first) when logprobs were asked."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptEvaluated:
    """`n` prompt tokens went through the model this step; with prompt logprobs (echo), one
    Sampled per token (the first token's logprob is None: nothing predicts it)."""

    n: int
    logprobs: list[Sampled] = field(default_factory=list)


@dataclass
class Text:
    """Released text of one field ("content" or "reasoning"); `logprobs`: the content tokens whose
    text is now complete."""

    kind: str
    text: str
    logprobs: list[Sampled] = field(default_factory=list)


@dataclass
class ToolCall:
    """A piece of tool call `index`: id and name come once, at its start; arguments in pieces."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class Finished:
    """The sequence ended: reason "stop", "length" or "tool_calls"; token counts for usage
    (reasoning_tokens: the generated tokens inside reasoning text, part of completion_tokens)."""

    reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0

    def usage(self) -> dict[str, object]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}


@dataclass
class Failed:
    """This sequence's step raised; it has ended (the others go on)."""

    message: str


Event = Sampled | PromptEvaluated | Text | ToolCall | Finished | Failed


# --- requests and sequences ------------------------------------------------------------------


@dataclass
class Request:
    """What to generate. max_tokens None: until the context is full. logprobs None: none; n: each
    content token's logprob and the n best. chat: parse Harmony (else raw text). stop_token_ids
    None: the vocabulary's end-of-generation ids. prompt_logprobs: logprobs of the prompt tokens
    too (a completion's echo); the prompt is then evaluated in full. constraint: the format the
    answer and tool calls must follow (pyengine.constrain.request_spec), enforced by a token mask."""

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    chat: bool = False
    stop_token_ids: Iterable[int] | None = None
    prompt_logprobs: bool = False
    constraint: Spec | None = None


class Sequence:
    """One generation on one cache (see the module docstring). Built by Core.start."""

    def __init__(self, core: Core, cache: Cache, req: Request) -> None:
        self.core, self.cache, self.req = core, cache, req
        tok = core.tokenizer
        prompt = req.prompt
        keep = 0 if req.prompt_logprobs else min(cache.common_prefix(prompt), len(prompt) - 1)
        keep = core.runner.rewind(cache, keep)
        self.n_cached = keep
        self.pending = prompt[keep:]
        self.history = list(prompt)
        self.sampler = Sampler(req.params)
        self.eog = frozenset(tok.eog_ids if req.stop_token_ids is None else req.stop_token_ids)
        self.parser = TokenParser(tok) if req.chat else None
        self.decoder = None if req.chat else codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopMatcher(req.stop)
        self.constraint = (None if req.constraint is None else
                           Constraint(req.constraint, tok, core.runner.n_vocab, req.chat, self.eog))
        self.sampled: list[Sampled] = []
        self.content_total = 0  # chars of content produced (released or held by the stop matcher)
        self.content_sent = 0  # chars of content released
        self.waiting: collections.deque[tuple[int, Sampled]] = collections.deque()  # (end, entry)
        self.last_prompt_row: np.ndarray | None = None
        self.logits: np.ndarray | None = None
        self.chosen: int | None = None  # the next token when the model picked it (argmax_only)
        self.tool_calls = 0
        self.reasoning_tokens = 0
        self.cancelled = False
        self.done = False

    @property
    def n_generated(self) -> int:
        return len(self.sampled)

    def cancel(self) -> None:
        """End before the next step (thread-safe: only sets a flag); finish_reason "stop"."""
        self.cancelled = True

    # --- one step: plan (host side), then evaluated (after the forward pass) -----------------

    def plan(self) -> tuple[list[Event], list[int]]:
        """This step's events so far and the tokens to evaluate (none when the sequence ended)."""
        if self.done:
            return [], []
        if self.cancelled:
            return self._finish("stop"), []
        if self.pending:
            chunk = self.pending[:self.core.runner.chunk_size(self.cache)]
            self.pending = self.pending[len(chunk):]
            return [], chunk
        return self._sample()

    @property
    def prompt_evaluated(self) -> bool:
        """The whole prompt is in the cache: logits, or the model's chosen token, followed it."""
        return not self.pending and (self.logits is not None or self.chosen is not None or bool(self.sampled))

    @property
    def argmax_only(self) -> bool:
        """The next token is the plain argmax of the logits (greedy, no bias, penalty, mask or
        logprobs): a model that can pick it itself (Runner.device_argmax) returns only the id."""
        return (self.sampler.params.plain_argmax and self.constraint is None and self.req.logprobs is None
                and not self.wants_all_logits)

    @property
    def wants_all_logits(self) -> bool:
        """Prompt chunks of a request for prompt logprobs need every row's logits."""
        return self.req.prompt_logprobs and not self.sampled

    def evaluated(self, tokens: list[int], logits: np.ndarray | int) -> list[Event]:
        """`tokens` from plan are in the cache now, followed by `logits` (every row's when
        wants_all_logits), or by the next token itself when the model picked it (argmax_only).
        Once the whole prompt is in, the cache's sliding rings are checkpointed, so that a next
        prompt that shares this one but not what is generated after it reuses it all; inside a
        long prompt, every checkpoint_min_step tokens (Runner.checkpoint_due), so that one that
        leaves it in the middle reuses all but the tokens after the checkpoint before that point."""
        if not self.sampled and (not self.pending or self.core.runner.checkpoint_due(self.cache)):
            self.core.runner.take_checkpoint(self.cache)
        if isinstance(logits, int):
            self.logits, self.chosen = None, logits
            return [] if self.sampled else [PromptEvaluated(len(tokens))]
        self.chosen = None
        if logits.ndim == 2:
            self.logits = logits[-1]
            return [PromptEvaluated(len(tokens), self._prompt_logprobs(tokens, logits))]
        self.logits = logits
        return [] if self.sampled else [PromptEvaluated(len(tokens))]

    def fail(self, error: BaseException) -> list[Event]:
        self.done = True
        self.cache.reset()  # what the failed pass wrote is unknown
        return [Failed(f"generation failed: {error}")]

    def _prompt_logprobs(self, tokens: list[int], rows: np.ndarray) -> list[Sampled]:
        out = []
        n_top = self.req.logprobs or 0
        for t, prev in zip(tokens, [self.last_prompt_row, *rows[:-1]]):
            if prev is None:
                out.append(Sampled(t))
            else:
                lp = log_softmax(prev)
                out.append(Sampled(t, float(lp[t]), top_logprobs(lp, n_top)))
        self.last_prompt_row = rows[-1]
        return out

    def _sample(self) -> tuple[list[Event], list[int]]:
        if self.chosen is not None:
            token, self.chosen = self.chosen, None
        else:
            mask = self.constraint.allowed() if self.constraint is not None else None
            token = self.sampler.sample(self.logits, self.history, mask)
        if self.constraint is not None:
            self.constraint.advance(token)
        entry = Sampled(token)
        if self.req.logprobs is not None:
            lp = log_softmax(self.logits)
            entry = Sampled(token, float(lp[token]), top_logprobs(lp, self.req.logprobs))
        self.sampled.append(entry)
        events: list[Event] = [entry]
        if token in self.eog:
            deltas = self.parser.feed(token) if self.parser is not None else []
            if not self._route(events, deltas + self._finish_text()):
                calls = token == self.core.call_id or self.tool_calls > 0
                events += self._finish("tool_calls" if calls else "stop", flushed=True)
            return events, []
        if self.parser is not None:
            was_reasoning = self.parser.in_reasoning
            deltas = self.parser.feed(token)
            self.reasoning_tokens += int(was_reasoning and self.parser.in_reasoning)
        else:
            text = self.decoder.decode(self.core.tokenizer.token_to_piece(token))
            deltas = [Delta("content", text, [self.n_generated - 1])]
        if self._route(events, deltas):
            return events, []
        limit = self.req.max_tokens is not None and self.n_generated >= self.req.max_tokens
        if limit or self.cache.n_past >= self.cache.n_ctx:
            events += self._finish("length")
            return events, []
        self.history.append(token)
        return events, [token]

    # --- text routing ------------------------------------------------------------------------

    def _finish_text(self) -> list[Delta]:
        if self.parser is not None:
            return self.parser.finish()
        return [Delta("content", self.decoder.decode(b"", final=True), [])]

    def _route(self, events: list[Event], deltas: list[Delta]) -> bool:
        """Turn parser deltas into events; True when a stop string ended the sequence."""
        for d in deltas:
            if d.kind == "content":
                if self._content(events, d.text, d.positions):
                    events += self._finish("stop", flushed=True)
                    return True
            elif d.kind == "reasoning":
                if d.text:
                    events.append(Text("reasoning", d.text))
            elif d.kind == "tool_call":
                self.tool_calls += 1
                events.append(ToolCall(d.index, id=d.id, name=d.name))
            elif d.text:
                events.append(ToolCall(d.index, arguments=d.text))
        return False

    def _content(self, events: list[Event], text: str, positions: list[int]) -> bool:
        self.content_total += len(text)
        if self.req.logprobs is not None:
            self.waiting.extend((self.content_total, self.sampled[p]) for p in positions)
        released, hit = self.stops.feed(text)
        self._release(events, released, hit)
        return hit

    def _release(self, events: list[Event], text: str, cut: bool) -> None:
        self.content_sent += len(text)
        entries = []
        while self.waiting and self.waiting[0][0] <= self.content_sent:
            entries.append(self.waiting.popleft()[1])
        if cut:
            self.waiting.clear()
        if text or entries:
            events.append(Text("content", text, entries))

    def _finish(self, reason: str, flushed: bool = False) -> list[Event]:
        """End the sequence: flush what the parser and the stop matcher hold (unless already
        flushed), then Finished. A stop string found in the flushed text makes it "stop"."""
        events: list[Event] = []
        if not flushed and self._route(events, self._finish_text()):
            return events
        self._release(events, self.stops.flush(), cut=False)
        self.done = True
        events.append(Finished(reason, len(self.req.prompt), self.n_cached, self.n_generated, self.reasoning_tokens))
        return events


class Core:
    """Sequences over one Runner (the shared model) and one tokenizer; `step` advances them."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.call_id = tokenizer.special_tokens.get("<|call|>")

    def check(self, req: Request, n_ctx: int) -> None:
        """ValueError for a request that cannot run (before anything is evaluated)."""
        prompt, n_vocab = req.prompt, self.runner.n_vocab
        if req.logprobs is not None and req.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {req.logprobs}")
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is outside the vocabulary (0..{n_vocab - 1})")
        for token, bias in req.params.logit_bias.items():
            if not 0 <= token < n_vocab:
                raise ValueError(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})")
            if math.isnan(bias) or bias == math.inf:  # both would make every probability NaN
                raise ValueError(f"logit_bias of token {token} is {'NaN' if math.isnan(bias) else '+inf'} "
                                 "(-inf bans a token)")
        if len(prompt) >= n_ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {n_ctx}")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {req.max_tokens}")

    def start(self, cache: Cache, req: Request) -> Sequence:
        """A sequence generating `req` on `cache`, reusing the longest prefix the cache holds."""
        req.prompt = [int(t) for t in req.prompt]
        req.stop = [s for s in req.stop if s]
        self.check(req, cache.n_ctx)
        return Sequence(self, cache, req)

    def _eval(self, seqs: list[Sequence], tokens: list[list[int]], logits_all: bool = False) -> list:
        """runner.eval of the sequences' tokens; where the model picks greedy tokens itself
        (Runner.device_argmax), the argmax_only sequences get their next token instead of logits."""
        caches = [s.cache for s in seqs]
        if self.runner.device_argmax:
            return self.runner.eval(caches, tokens, logits_all, [s.argmax_only for s in seqs])
        return self.runner.eval(caches, tokens, logits_all)

    def step(self, seqs: Seq[Sequence]) -> list[list[Event]]:
        """One step of every sequence: plan each (sample its next token or take its next prompt
        chunk), then evaluate all their tokens in one forward pass. A sequence whose step fails
        gets a Failed event; if the batched pass fails, each sequence is evaluated alone so the
        failure ends only the request that caused it."""
        out: list[list[Event]] = [[] for _ in seqs]
        work: list[tuple[int, Sequence, list[int]]] = []
        for i, seq in enumerate(seqs):
            try:
                events, tokens = seq.plan()
            except Exception as e:  # noqa: BLE001 - one request's failure must not end the others
                log.exception("a generation step failed")
                events, tokens = seq.fail(e), []
            out[i] += events
            if tokens:
                work.append((i, seq, tokens))
        together = [w for w in work if not w[1].wants_all_logits]
        alone = [w for w in work if w[1].wants_all_logits]
        if len(together) > 1:
            try:
                rows = self._eval([s for _, s, _ in together], [t for _, _, t in together])
            except Exception:  # noqa: BLE001
                log.warning("batched step failed; evaluating its %d sequences one by one", len(together),
                            exc_info=True)
                alone += together
            else:
                for (i, seq, tokens), row in zip(together, rows):
                    out[i] += seq.evaluated(tokens, row)
        else:
            alone += together
        for i, seq, tokens in alone:
            try:
                logits = self._eval([seq], [tokens], seq.wants_all_logits)[0]
            except Exception as e:  # noqa: BLE001
                log.exception("a generation step failed")
                out[i] += seq.fail(e)
            else:
                out[i] += seq.evaluated(tokens, logits)
        return out
