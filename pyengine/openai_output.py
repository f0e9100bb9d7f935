"""Core events -> OpenAI objects: `chat.completion` / `chat.completion.chunk` and `text_completion`.

One module for the library (Engine.create_*completion, shaped like llama-cpp-python's dicts) and
the node (/v1/chat/completions, /v1/completions), so both answer the same request the same way.
A response object is fed the events of its sequence step by step: `chunk(events)` gives the
streamed chunk of those events (or None) and accumulates them; `result(finished)` is the
non-streamed object built from the same accumulation, so streamed and non-streamed answers
cannot differ. `extra` holds the top-level fields one side adds (the node's system_fingerprint),
`reasoning_alias` the node's `reasoning` copy of `reasoning_content`. `index` is the choice's index
when one request asks for several (n > 1): each choice has its own object, sharing `id` and
`created`, and the node merges their choices (pyengine.node.choices)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

from pyengine.core import Event, Finished, PromptEvaluated, Sampled, Text, ToolCall
from pyengine.tokenizer import Tokenizer


def token_entry(tokenizer: Tokenizer, entry: Sampled) -> dict[str, Any]:
    """OpenAI's chat logprobs entry: token, logprob, bytes, top_logprobs."""
    def piece(t: int) -> tuple[str, list[int]]:
        raw = tokenizer.token_to_piece(t)
        return raw.decode("utf-8", errors="replace"), list(raw)

    text, raw = piece(entry.id)
    top = [{"token": t, "logprob": lp, "bytes": b} for (t, b), lp in ((piece(i), lp) for i, lp in entry.top or [])]
    return {"token": text, "logprob": entry.logprob, "bytes": raw, "top_logprobs": top}


class ChatOutput:
    """One chat completion's objects; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer, model: str, logprobs: bool, extra: dict[str, Any] | None = None,
                 reasoning_alias: bool = False, index: int = 0) -> None:
        self.tokenizer, self.model, self.logprobs, self.index = tokenizer, model, logprobs, index
        self.id, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.extra = extra or {}
        self.alias = reasoning_alias
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.entries: list[dict[str, Any]] = []

    def _shell(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **self.extra}

    def _chunk(self, delta: dict[str, Any], finish: str | None, lp: list | None = None) -> dict[str, Any]:
        return {**self._shell("chat.completion.chunk"), "choices": [
            {"index": self.index, "delta": delta, "logprobs": {"content": lp} if lp is not None else None,
             "finish_reason": finish}]}

    def head(self) -> dict[str, Any]:
        """The first chunk: the role only (`content` null, as llama-server sends it)."""
        return self._chunk({"role": "assistant", "content": None}, None)

    def chunk(self, events: Iterable[Event]) -> dict[str, Any] | None:
        """The chunk of one step's events (None when they carry no output); accumulates them."""
        delta: dict[str, Any] = {}
        lp: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, Text):
                field = "content" if ev.kind == "content" else "reasoning_content"
                (self.content if ev.kind == "content" else self.reasoning).append(ev.text)
                if ev.text:
                    delta[field] = delta.get(field, "") + ev.text
                if self.logprobs:
                    lp += [token_entry(self.tokenizer, e) for e in ev.logprobs]
            elif isinstance(ev, ToolCall):
                delta.setdefault("tool_calls", []).append(self._tool_delta(ev))
        self.entries += lp
        if self.alias and "reasoning_content" in delta:
            delta["reasoning"] = delta["reasoning_content"]
        if not delta and not lp:
            return None
        return self._chunk(delta, None, lp if lp else None)

    def _tool_delta(self, ev: ToolCall) -> dict[str, Any]:
        call = self.calls.get(ev.index)
        if call is None:
            call = self.calls[ev.index] = {"id": ev.id or f"call_{secrets.token_hex(12)}", "type": "function",
                                           "function": {"name": ev.name or "", "arguments": ""}}
            call["function"]["arguments"] += ev.arguments
            return {"index": ev.index, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ev.arguments}}
        call["function"]["arguments"] += ev.arguments
        return {"index": ev.index, "function": {"arguments": ev.arguments}}

    def tail(self, fin: Finished, include_usage: bool = False, **fields: Any) -> list[dict[str, Any]]:
        """The closing chunks: finish_reason (plus `fields`, e.g. the node's timings), then usage
        when asked for (stream_options.include_usage)."""
        out = [{**self._chunk({}, fin.reason), **fields}]
        if include_usage:
            out.append({**self._shell("chat.completion.chunk"), "choices": [], "usage": fin.usage()})
        return out

    def result(self, fin: Finished, **fields: Any) -> dict[str, Any]:
        """The non-streamed chat.completion of everything accumulated."""
        text = "".join(self.content)
        reasoning = "".join(self.reasoning) or None
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not self.calls else None,
                                   "reasoning_content": reasoning}
        if self.alias and reasoning:
            message["reasoning"] = reasoning
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        choice = {"index": self.index, "message": message, "finish_reason": fin.reason,
                  "logprobs": {"content": self.entries} if self.logprobs else None}
        return {**self._shell("chat.completion"), "choices": [choice], "usage": fin.usage(), **fields}


class TextOutput:
    """One text completion's objects (OpenAI's legacy logprobs: tokens, token_logprobs,
    top_logprobs, text_offset). echo: the prompt's text comes first, and with logprobs the
    prompt's tokens have entries too (the first one's logprob is None)."""

    def __init__(self, tokenizer: Tokenizer, model: str, prompt_text: str, echo: bool, logprobs: bool,
                 extra: dict[str, Any] | None = None, index: int = 0) -> None:
        self.tokenizer, self.model, self.logprobs, self.index = tokenizer, model, logprobs, index
        self.id, self.created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        self.extra = extra or {}
        self.echo = prompt_text if echo else ""
        self.text: list[str] = []
        self.offset = 0
        self.lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.tokens: list[int] = []

    def _object(self, text: str, finish: str | None, lp: dict | None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                **self.extra, "choices": [{"text": text, "index": self.index, "logprobs": lp, "finish_reason": finish}]}

    def _entries(self, entries: list[Sampled]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.tokenizer.token_to_piece(e.id).decode("utf-8", errors="replace")
            out["tokens"].append(text)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(None if e.top is None else {
                self.tokenizer.token_to_piece(t).decode("utf-8", errors="replace"): lp for t, lp in e.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        for k, v in out.items():
            self.lp[k] += v
        return out

    def head(self) -> dict[str, Any] | None:
        """The first chunk when echoing (the prompt text), else None."""
        return self._object(self.echo, None, None) if self.echo else None

    def chunk(self, events: Iterable[Event]) -> dict[str, Any] | None:
        text, entries = "", []
        for ev in events:
            if isinstance(ev, Sampled):
                self.tokens.append(ev.id)
            elif isinstance(ev, PromptEvaluated) and self.echo and self.logprobs:
                entries += ev.logprobs
            elif isinstance(ev, Text):
                text += ev.text
                entries += ev.logprobs
        self.text.append(text)
        lp = self._entries(entries) if self.logprobs and entries else None
        if not text and lp is None:
            return None
        return self._object(text, None, lp)

    def tail(self, fin: Finished, include_usage: bool = False, **fields: Any) -> list[dict[str, Any]]:
        out = [{**self._object("", fin.reason, None), **fields}]
        if include_usage:
            out.append({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                        **self.extra, "choices": [], "usage": fin.usage()})
        return out

    def result(self, fin: Finished, **fields: Any) -> dict[str, Any]:
        obj = self._object(self.echo + "".join(self.text), fin.reason, self.lp if self.logprobs else None)
        return {**obj, "usage": fin.usage(), **fields}
