"""OpenAI-shaped results from the generate loop, the way llama-cpp-python's `Llama` returns them.

`completion(...)` and `chat_completion(...)` turn TokenEvents into the dicts (or, streamed, the
chunk dicts) of `create_completion` / `create_chat_completion`, so code written for
llama-cpp-python reads the same. gpt-oss answers in harmony: a chat completion's text goes through
the streaming harmony parser, which separates `reasoning_content`, `content` and `tool_calls`;
stop strings apply to the answer (`content`) only, never to the reasoning or tool arguments."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pyengine.generate import TokenEvent
from pyengine.harmony import StreamingParser
from pyengine.stops import StopMatcher
from pyengine.tokenizer import Tokenizer


def _piece(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_to_piece(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _completion_logprobs(tokenizer: Tokenizer, events: list[TokenEvent], offset: int) -> dict[str, Any]:
    """llama-cpp-python's completion logprobs: tokens, text_offset, token_logprobs, top_logprobs."""
    tokens, offsets, lps, tops = [], [], [], []
    for ev in events:
        text, _ = _piece(tokenizer, ev.id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        lps.append(ev.logprob)
        tops.append({_piece(tokenizer, t)[0]: lp for t, lp in ev.top_logprobs or []})
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": lps, "top_logprobs": tops}


def _chat_logprobs(tokenizer: Tokenizer, events: Iterable[TokenEvent]) -> list[dict[str, Any]]:
    """OpenAI's chat logprobs content entries: token, logprob, bytes, top_logprobs."""
    out = []
    for ev in events:
        text, raw = _piece(tokenizer, ev.id)
        top = [{"token": t, "logprob": lp, "bytes": b}
               for (t, b), lp in ((_piece(tokenizer, i), lp) for i, lp in ev.top_logprobs or [])]
        out.append({"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": top})
    return out


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion}


def completion(events: Iterator[TokenEvent], tokenizer: Tokenizer, model: str, prompt: list[int],
               prompt_text: str, echo: bool, logprobs: bool, stream: bool
               ) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """create_completion's result: one `text_completion` dict, or an iterator of chunks."""
    cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def shell(text: str, finish: str | None, lp: dict | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

    head = prompt_text if echo else ""
    if stream:
        def chunks() -> Iterator[dict[str, Any]]:
            offset = len(head)
            if head:
                yield shell(head, None, None)
            n = 0
            for ev in events:
                n += 1
                lp = _completion_logprobs(tokenizer, [ev], offset) if logprobs else None
                offset += len(ev.text)
                yield shell(ev.text, ev.finish_reason, lp)
                if ev.finish_reason:
                    return
            yield shell("", "stop", None)  # cancelled before the first token
        return chunks()
    done = list(events)
    text = head + "".join(ev.text for ev in done)
    finish = done[-1].finish_reason if done else "stop"
    result = shell(text, finish, _completion_logprobs(tokenizer, done, len(head)) if logprobs else None)
    result["usage"] = _usage(len(prompt), len(done))
    result["tokens"] = [ev.id for ev in done]
    return result


class ChatStream:
    """Parses harmony text as it arrives and applies the stop strings to the answer: deltas(event)
    gives OpenAI delta dicts (reasoning_content, content, tool_calls); finish_reason(last event)."""

    def __init__(self, stop: list[str]) -> None:
        self.parser = StreamingParser()
        self.stops = StopMatcher(stop)
        self.stopped = False
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def deltas(self, ev: TokenEvent) -> list[dict[str, Any]]:
        raw = self.parser.feed(ev.text)
        if ev.finish_reason:
            raw += self.parser.finish()
        out = []
        for d in raw:
            if "content" in d:
                text, hit = self.stops.feed(d["content"])
                if hit:
                    self.stopped = True
                if text:
                    self.content.append(text)
                    out.append({"content": text})
                if hit:
                    break
            else:
                if "reasoning_content" in d:
                    self.reasoning.append(d["reasoning_content"])
                out.append(d)
        if ev.finish_reason and not self.stopped:
            tail = self.stops.flush()
            if tail:
                self.content.append(tail)
                out.append({"content": tail})
        return out

    def finish_reason(self, ev: TokenEvent | None) -> str:
        if self.stopped or ev is None:
            return "stop"
        if self.parser.message()["tool_calls"]:
            return "tool_calls"
        return ev.finish_reason or "stop"


def chat_completion(events: Iterator[TokenEvent], tokenizer: Tokenizer, model: str, prompt: list[int],
                    stop: list[str], logprobs: bool, stream: bool
                    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
    """create_chat_completion's result: one `chat.completion` dict, or an iterator of chunks."""
    cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    state = ChatStream(stop)
    if stream:
        def chunk(delta: dict[str, Any], finish: str | None, lp: list | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta,
                                 "logprobs": {"content": lp} if lp is not None else None,
                                 "finish_reason": finish}]}

        def chunks() -> Iterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": None}, None)
            last = None
            for ev in events:
                last = ev
                lp = _chat_logprobs(tokenizer, [ev]) if logprobs else None
                for d in state.deltas(ev):
                    yield chunk(d, None, lp)
                    lp = None
                if state.stopped:
                    break
            yield chunk({}, state.finish_reason(last))
        return chunks()
    done: list[TokenEvent] = []
    for ev in events:
        done.append(ev)
        state.deltas(ev)
        if state.stopped:
            break
    parsed = state.parser.message()
    message = {"role": "assistant",
               "content": "".join(state.content) if state.content or parsed["content"] is not None else None,
               "reasoning_content": "".join(state.reasoning) if state.reasoning else None}
    if parsed["tool_calls"]:
        message["tool_calls"] = parsed["tool_calls"]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": _chat_logprobs(tokenizer, done)} if logprobs else None,
                         "finish_reason": state.finish_reason(done[-1] if done else None)}],
            "usage": _usage(len(prompt), len(done))}
