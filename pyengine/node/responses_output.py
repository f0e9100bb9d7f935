"""Core events -> OpenAI Responses API objects: the `response` object and its stream events.

The chat path's shaping (pyengine.openai_output) in the Responses API's terms: one generation's
reasoning text becomes a `reasoning` output item (its text as reasoning_text content), answer text
a `message` item with one output_text part, each tool call a `function_call` item, in the order
the model wrote them. `head()` gives the opening events, `chunk(events)` the events of one step
(and accumulates them), `tail(finished)` the closing ones, ending with `response.completed` (or
`response.incomplete` when max_output_tokens cut the answer) that carries the whole object;
`result(finished)` is that same object for a non-streamed request, so streamed and non-streamed
answers cannot differ. Every event carries `type` and `sequence_number`, as OpenAI's do."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

from pyengine.core import Event, Finished, Text, ToolCall
from pyengine.openai_output import token_entry
from pyengine.tokenizer import Tokenizer


def _usage(fin: Finished) -> dict[str, Any]:
    return {"input_tokens": fin.prompt_tokens, "input_tokens_details": {"cached_tokens": fin.cached_tokens},
            "output_tokens": fin.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": fin.reasoning_tokens},
            "total_tokens": fin.prompt_tokens + fin.completion_tokens}


class ResponseOutput:
    """One response's objects; see the module docstring. `echo`: the request's settings the
    response object repeats (instructions, tools, tool_choice, temperature, ...)."""

    def __init__(self, tokenizer: Tokenizer, model: str, echo: dict[str, Any], logprobs: bool) -> None:
        self.tokenizer, self.model, self.echo, self.logprobs = tokenizer, model, echo, logprobs
        self.id, self.created = f"resp_{secrets.token_hex(24)}", int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item text is still arriving for
        self.calls: dict[int, dict[str, Any]] = {}  # core tool-call index -> its item
        self.seq = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def response(self, status: str, fin: Finished | None = None) -> dict[str, Any]:
        """The response object as it stands."""
        incomplete = status == "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": [dict(i) for i in self.items] if fin else [],
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "usage": _usage(fin) if fin else None, **self.echo}

    def head(self) -> list[dict[str, Any]]:
        """response.created and response.in_progress."""
        return [self._event(kind, response=self.response("in_progress"))
                for kind in ("response.created", "response.in_progress")]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Close the open item, open `item`: its output_item.added (and content_part.added)."""
        out = self._close()
        self.items.append(item)
        self.open = item
        out.append(self._event("response.output_item.added", output_index=len(self.items) - 1,
                               item={**item, "status": "in_progress",
                                     **({"content": []} if "content" in item else {})}))
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        elif item["type"] == "reasoning":
            out.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                   part={"type": "reasoning_text", "text": ""}))
        return out

    def _close(self) -> list[dict[str, Any]]:
        """The open item's closing events (its text complete)."""
        item, out = self.open, []
        if item is None:
            return out
        where = self._where()
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            extra = {"logprobs": part["logprobs"]} if item["type"] == "message" else {}
            out.append(self._event(done, **where, content_index=0, text=part["text"], **extra))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=dict(part)))
        else:
            out.append(self._event("response.function_call_arguments.done", **where, arguments=item["arguments"]))
        self.open = None
        out.append(self._event("response.output_item.done", output_index=where["output_index"], item=dict(item)))
        return out

    def chunk(self, events: Iterable[Event]) -> list[dict[str, Any]]:
        """The stream events of one step's events; accumulates them."""
        out: list[dict[str, Any]] = []
        for ev in events:
            if isinstance(ev, Text):
                out += self._text(ev)
            elif isinstance(ev, ToolCall):
                out += self._call(ev)
        return out

    def _text(self, ev: Text) -> list[dict[str, Any]]:
        kind = "message" if ev.kind == "content" else "reasoning"
        lp = [token_entry(self.tokenizer, e) for e in ev.logprobs] if self.logprobs and kind == "message" else []
        if not ev.text and not lp:
            return []
        out = []
        if self.open is None or self.open["type"] != kind:
            if kind == "message":
                item = {"type": "message", "id": f"msg_{secrets.token_hex(24)}", "status": "completed",
                        "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": [],
                                                          "logprobs": []}]}
            else:
                item = {"type": "reasoning", "id": f"rs_{secrets.token_hex(24)}", "summary": [],
                        "content": [{"type": "reasoning_text", "text": ""}], "status": "completed"}
            out += self._start(item)
        part = self.open["content"][0]
        part["text"] += ev.text
        if kind == "message":
            part["logprobs"] += lp
            out.append(self._event("response.output_text.delta", **self._where(), content_index=0, delta=ev.text,
                                   logprobs=lp))
        else:
            out.append(self._event("response.reasoning_text.delta", **self._where(), content_index=0, delta=ev.text))
        return out

    def _call(self, ev: ToolCall) -> list[dict[str, Any]]:
        out = []
        if ev.index not in self.calls:
            item = {"type": "function_call", "id": f"fc_{secrets.token_hex(24)}",
                    "call_id": ev.id or f"call_{secrets.token_hex(12)}", "name": ev.name or "", "arguments": "",
                    "status": "completed"}
            self.calls[ev.index] = item
            out += self._start(item)
        item = self.calls[ev.index]
        if ev.arguments:
            item["arguments"] += ev.arguments
            if item is self.open:
                out.append(self._event("response.function_call_arguments.delta", **self._where(),
                                       delta=ev.arguments))
        return out

    def _status(self, fin: Finished) -> str:
        return "incomplete" if fin.reason == "length" else "completed"

    def tail(self, fin: Finished) -> list[dict[str, Any]]:
        """The open item's closing events, then response.completed (or response.incomplete)."""
        out = self._close()
        status = self._status(fin)
        out.append(self._event(f"response.{status}", response=self.response(status, fin)))
        return out

    def failed(self, message: str, code: str) -> dict[str, Any]:
        """response.failed: generation stopped with an error (or the node shut down)."""
        self._close()
        return self._event("response.failed", response={
            **self.response("failed"), "output": [dict(i) for i in self.items],
            "error": {"code": code, "message": message}})

    def result(self, fin: Finished) -> dict[str, Any]:
        """The non-streamed response object of everything accumulated."""
        self._close()
        return self.response(self._status(fin), fin)

    def answer(self) -> tuple[str, str, list[dict[str, Any]]]:
        """Reasoning text, answer text and tool calls (chat shape), for the response store."""
        reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        content = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        return reasoning, content, calls
