"""OpenAI's Responses API (POST /v1/responses) as a chat request, and the responses kept for
`previous_response_id`.

vLLM recommends this API for gpt-oss and llama-server accepts it; here, as in llama-server, a
Responses request is turned into the chat request it means (`chat_request`) and runs the chat
path unchanged: the same Harmony renderer, constraints, scheduler and generation core. Only the
answer's shape differs (pyengine.node.responses_output). Input items map onto chat messages:
`message` items by role, `reasoning` items onto the next assistant turn's reasoning,
`function_call` items onto that turn's tool calls, `function_call_output` items onto tool
messages; `instructions` is a developer message in front (and, as OpenAI does, not carried over
to a later response). Anything the model cannot read (images, files, hosted tools, item
references) is a 400 that names the item.

A stored response keeps the chat messages of its whole conversation, so a request naming it as
`previous_response_id` continues from there. The store lives in the node's memory (lost at
restart), bounded by count and by size; the oldest go first."""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

from pyengine.node.schemas import (
    TEXT_PART_TYPES,
    ChatCompletionRequest,
    ResponsesRequest,
    SamplingFields,
    bad_request,
)

SAMPLING = tuple(SamplingFields.model_fields)  # passed to the chat request as they are


def _text(content: Any, where: str) -> str:
    """A content value (a string, or a list of text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts", "input")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
            continue
        if kind not in TEXT_PART_TYPES:
            raise bad_request(f"{where}.content[{i}]: content part type {str(kind)[:40]!r} is not supported "
                              "(this model reads text only)", "input")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{i}] needs a string `text`", "input")
        parts.append(part["text"])
    return "".join(parts)


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                      for p in parts):
                raise bad_request(f"{where}.{key} must be a list of parts with a string `text`", "input")
            return "".join(p["text"] for p in parts)
    return ""


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input items as chat messages (see the module docstring)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning: str | None = None  # a reasoning item's text, for the assistant turn that follows

    def assistant_turn() -> dict[str, Any]:
        """The assistant message that the next assistant item belongs to."""
        nonlocal reasoning
        last = out[-1] if out else None
        if last is None or last["role"] != "assistant" or reasoning is not None:
            last = {"role": "assistant", "content": None}
            if reasoning is not None:
                last["reasoning_content"] = reasoning
            out.append(last)
        reasoning = None
        return last

    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role must be user, assistant, system or developer", "input")
            text = _text(item.get("content"), where)
            if role == "assistant":
                turn = assistant_turn()
                if turn.get("tool_calls"):  # an answer after this turn's calls: a turn of its own
                    turn = {"role": "assistant", "content": None}
                    out.append(turn)
                turn["content"] = (turn["content"] or "") + text
            else:
                out.append({"role": role, "content": text})
        elif kind == "function_call":
            name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "")
            if not isinstance(name, str) or not name or not isinstance(call_id, str) or not isinstance(args, str):
                raise bad_request(f"{where}: a function_call needs string name, call_id and arguments", "input")
            assistant_turn().setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}: a function_call_output needs a string call_id", "input")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), where)})
        elif kind == "reasoning":
            reasoning = (reasoning or "") + _reasoning_text(item, where)
        elif kind == "item_reference":
            raise bad_request(f"{where}: item references are not supported; send the items themselves, "
                              "or previous_response_id", "input")
        else:
            raise bad_request(f"{where}: input item type {str(kind)[:40]!r} is not supported", "input")
    if reasoning is not None:
        assistant_turn()
    return out


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
    """The chat request a Responses request means, after the stored conversation `history`, and
    the conversation so far (history plus this input, without the instructions) to store."""
    conversation = history + input_messages(req.input)
    names: dict[str, str] = {}
    for m in conversation:  # a tool result names its function, as the chat path's tool messages do
        for call in m.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
        if m["role"] == "tool" and m["tool_call_id"] in names:
            m["name"] = names[m["tool_call_id"]]
    if not any(m["role"] in ("user", "assistant", "tool") for m in conversation):
        raise bad_request("input needs at least one user, assistant or tool item", "input")
    lead = [{"role": "developer", "content": req.instructions}] if req.instructions else []
    body: dict[str, Any] = {"messages": lead + conversation, "stream": False}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            include={"name", "description", "parameters"}, exclude_none=True)} for t in req.tools]
    choice = req.tool_choice
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        body["tool_choice"] = choice
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    if req.reasoning and req.reasoning.effort:
        body["reasoning_effort"] = req.reasoning.effort
    fmt = req.text.format if req.text else None
    if fmt and fmt["type"] == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt and fmt["type"] == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name") or "answer", "schema": fmt["schema"]}}
    logprobs = req.logprobs()
    if logprobs is not None:
        body.update(logprobs=True, top_logprobs=logprobs)
    body.update({k: getattr(req, k) for k in SAMPLING if getattr(req, k) is not None})
    try:
        return ChatCompletionRequest.model_validate(body, strict=True), conversation
    except ValueError as e:  # pydantic's ValidationError: a message the items' checks did not catch
        raise bad_request(f"cannot run this input: {str(e).splitlines()[-1].strip()}", "input") from None


def output_messages(reasoning: str, content: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's answer as the chat message a later turn renders."""
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return [message] if content or reasoning or calls else []


class ResponseStore:
    """Finished responses by id, with the chat messages of their conversations: at most `count`
    of them and about `max_bytes` of JSON; the oldest are dropped first. Thread-safe."""

    def __init__(self, count: int = 1024, max_bytes: int = 64 << 20) -> None:
        self.count, self.max_bytes = count, max_bytes
        self._items: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = \
            collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(messages))
        with self._lock:
            self._drop(response["id"])
            self._items[response["id"]] = (response, messages, size)
            self._bytes += size
            while self._items and (len(self._items) > self.count or self._bytes > self.max_bytes):
                self._drop(next(iter(self._items)))

    def response(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._items.get(response_id)
            return found[0] if found else None

    def messages(self, response_id: str) -> list[dict[str, Any]] | None:
        with self._lock:
            found = self._items.get(response_id)
            return list(found[1]) if found else None

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        found = self._items.pop(response_id, None)
        if found:
            self._bytes -= found[2]
        return found is not None
