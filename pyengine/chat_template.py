"""Render a GGUF file's own jinja chat template (the chat_template="gguf" option), safely.

Templates come from model files, i.e. from strangers, so they run in jinja2's immutable sandbox.
The environment offers what Hugging Face templates expect (the transformers conventions):
trim_blocks/lstrip_blocks, loop controls, a `tojson` that does not HTML-escape, `raise_exception`
and `strftime_now`; messages are given as plain JSON data with the reasoning text under both
`reasoning_content` and `thinking` (the gpt-oss template reads `thinking`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyengine.harmony import render_chat
from pyengine.tokenizer import Tokenizer

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template could not be compiled or raised an error while rendering."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def compile_template(template: str) -> None:
    """Check that `template` compiles (ChatTemplateError with jinja's message if not)."""
    _compile(template)


def _plain(value: Any) -> Any:
    """A copy made only of JSON types, so the sandbox never sees a caller's rich object."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"chat template inputs must be JSON data, not {type(value).__name__}")


def template_messages(messages: Sequence[Mapping[str, Any]], arguments_as_objects: bool = True) -> list[dict[str, Any]]:
    """Messages as templates expect them: reasoning under every reasoning name, and (by default)
    tool-call arguments given as JSON text turned into objects, as llama.cpp does for templates."""
    out = []
    for message in _plain(list(messages)):
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        if arguments_as_objects and message.get("tool_calls"):
            message["tool_calls"] = [_arguments_to_object(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _arguments_to_object(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            return call
        return {**call, "function": {**fn, "arguments": args}}
    return call


def render_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Iterable[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    arguments_as_objects: bool = True,
    **kwargs: Any,
) -> str:
    """The prompt text the template makes of messages (kwargs such as reasoning_effort pass through)."""
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=template_messages(messages, arguments_as_objects),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **_plain(kwargs),
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None


def apply_chat_template(
    tokenizer: Tokenizer,
    metadata: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    tools: Iterable[Mapping[str, Any]] | None = None,
    reasoning_effort: str = "medium",
    current_date: str | None = None,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """Prompt token ids: chat_template None/"harmony" = the built-in openai-harmony renderer;
    "gguf" = the file's tokenizer.chat_template; any other string = that jinja template's text.
    Jinja templates take the date from strftime_now, so current_date applies to harmony only."""
    if chat_template in (None, "harmony"):
        return render_chat(tokenizer, messages, tools, reasoning_effort, current_date, add_generation_prompt)
    template = metadata.get("tokenizer.chat_template") if chat_template == "gguf" else chat_template
    if not template:
        raise ChatTemplateError(
            "this model file embeds no chat template (tokenizer.chat_template); use the built-in harmony renderer"
        )
    text = render_template(template, messages, tools, add_generation_prompt, reasoning_effort=reasoning_effort)
    return tokenizer.encode(text, special=True)
