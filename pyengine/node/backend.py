"""The one narrow door between the HTTP node and a model.

A `Backend` is a loaded model as the node sees it: its tokenizer, how a chat becomes prompt
tokens, its `ModelInfo`, and the generation core (pyengine.core.Core) that the scheduler drives
with one `step(active sequences)` per iteration, exactly as the library drives it with one
sequence. The node never sees logits or control tokens: the core hands back typed events
(reasoning / content / tool-call pieces, finish, usage)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyengine.core import Core
from pyengine.runner import Cache
from pyengine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pyengine.engine_state import EngineState


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


class Backend(ABC):
    """A loaded model behind the node. Subclasses set `info`, `tokenizer` and `core`."""

    info: ModelInfo
    tokenizer: Tokenizer
    core: Core
    device: str = "cpu"
    n_threads: int = 0
    path: str = ""  # the model file ("" when there is none)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; with `special`, control-token spellings become their ids."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of `tokens` (control tokens spelled out)."""
        return self.tokenizer.decode([int(t) for t in tokens])

    @abstractmethod
    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        """Prompt tokens for a chat, ending where the assistant starts its answer.

        `messages` are normalised by the node: {"role", "content": str, "thinking": str | None
        (from reasoning_content / reasoning / thinking), "tool_calls": [{"id", "name",
        "arguments": str}] | None, "tool_call_id", "name"}; `tools` are OpenAI function
        definitions ({"name", "description", "parameters"}). Raise ValueError for a history
        that cannot be rendered (answered as 400)."""

    def new_cache(self) -> Cache:
        """A KV cache for one slot (n_ctx = info.n_ctx)."""
        return self.core.runner.new_cache(self.info.n_ctx)

    def chat_template_text(self) -> str:
        """The chat template text /props shows ("" when chats render with the built-in renderer only)."""
        return ""

    def save_slot(self, cache: Cache) -> EngineState:
        """A copy of what `cache` holds (POST /slots/{id}?action=save). NotImplementedError where
        the cache cannot be read back (answered as 501)."""
        raise NotImplementedError("this backend cannot save a slot's KV cache")

    def restore_slot(self, cache: Cache, state: EngineState) -> None:
        """Make `cache` hold `state` (POST /slots/{id}?action=restore); ValueError, with `cache`
        untouched, for a state of another model or cache type or one that does not fit."""
        raise NotImplementedError("this backend cannot restore a slot's KV cache")

    def describe(self) -> dict[str, Any]:
        """The model as /props shows it: arch, quantization (the weight type holding the most
        parameters), size_bytes, n_params."""
        return {"arch": "", "quantization": "", "size_bytes": self.info.size_bytes, "n_params": self.info.n_params}

    def expert_counts(self) -> list[list[int]]:
        """Per layer, how often each expert was selected so far."""
        return [[int(n) for n in row] for row in self.core.runner.expert_counts]

    def close(self) -> None:
        """Release the model."""
