"""The one narrow door between the HTTP node and a model.

Everything model-specific sits behind `Backend` (tokenize, render a chat into prompt tokens, make
per-sequence slots, run one scheduler step over the active slots) and `Slot` (one sequence's KV
state, sampler and Harmony output parser). The node never sees logits or control tokens: a slot's
step hands back text already split into reasoning / content / tool-call pieces.

`Backend.step` is the place for continuous batching: it receives every active slot of one
scheduler step. The default runs the slots one after another (the engine's current contract is
one sequence per Engine); an engine with a multi-sequence decode overrides it to run them in one
forward pass, and nothing above this module changes."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyengine.sampling import SamplingParams

log = logging.getLogger("pyengine")


@dataclass
class TokenLogprob:
    """A sampled token's log-probability and the `top` most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A piece of the `index`-th tool call: id and name come once, arguments in pieces."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class StepOutput:
    """What one scheduler step did for one slot.

    `token` is None when the step only evaluated prompt tokens (`prompt_evaluated` of them).
    `done` means the model ended its turn (an end-of-generation token); `tool_call` that the
    turn ended by calling a tool; `error` that this slot's step failed (its request ends, the
    others go on)."""

    token: int | None = None
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprob: TokenLogprob | None = None
    prompt_evaluated: int = 0
    done: bool = False
    tool_call: bool = False
    error: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model as /v1/models and the router see it."""

    name: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    size_bytes: int
    n_layer: int = 0
    n_expert: int = 0
    aliases: tuple[str, ...] = ()

    def answers_to(self, model: str | None) -> bool:
        """True when a request's `model` names this model (or names none)."""
        if not model:
            return True
        wanted = model.strip().lower()
        names = {self.name.lower(), *(a.lower() for a in self.aliases)}
        return wanted in names or wanted.replace(":", "-") in names or wanted.replace(":", "_") in names


class Slot(ABC):
    """One sequence's model state, used only from the scheduler's worker thread."""

    @abstractmethod
    def start(self, prompt: Sequence[int], params: SamplingParams, chat: bool, logprobs: int | None) -> int:
        """Prepare to generate after `prompt`; return how many leading prompt tokens are reused
        from this slot's cache. `chat` selects the Harmony parser (else raw text out);
        `logprobs` None: none, n: each token's logprob and the n most likely alternatives."""

    @abstractmethod
    def step(self) -> StepOutput:
        """Do one unit of work: a chunk of prompt evaluation, or one sampled token."""

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` this slot's cache already holds (slot choice)."""
        return 0

    def flush(self) -> StepOutput:
        """Text still held back (a partial UTF-8 sequence, an undecided Harmony header) when the
        scheduler ends the request before the model did (max_tokens, full context)."""
        return StepOutput()

    @property
    @abstractmethod
    def n_past(self) -> int:
        """Tokens now held in this slot's KV cache."""


class Backend(ABC):
    """A loaded model behind the node. Subclasses set `info`."""

    info: ModelInfo

    @abstractmethod
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; with `special`, control-token spellings become their ids."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` (control tokens spelled out)."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        """Prompt tokens for a chat, ending where the assistant starts its answer.

        `messages` are normalised by the node: {"role", "content": str, "thinking": str | None
        (from reasoning_content / reasoning / thinking), "tool_calls": [{"id", "name",
        "arguments": str}] | None, "tool_call_id", "name"}; `tools` are OpenAI function
        definitions ({"name", "description", "parameters"}). Raise ValueError for a history
        that cannot be rendered (answered as 400)."""

    @abstractmethod
    def new_slot(self) -> Slot:
        """A fresh sequence slot with its own KV cache."""

    def step(self, slots: list[Slot]) -> list[StepOutput]:
        """One scheduler step over every active slot (see the module docstring). A slot whose
        step raises gets an `error` output; the other slots are unaffected."""
        outputs = []
        for slot in slots:
            try:
                outputs.append(slot.step())
            except Exception as e:
                log.exception("a generation step failed")
                outputs.append(StepOutput(error=f"generation failed: {e}"))
        return outputs

    def expert_counts(self) -> list[list[int]]:
        """Per layer, how often each expert was selected so far (empty if not tracked)."""
        return []

    def close(self) -> None:
        """Release the model."""
