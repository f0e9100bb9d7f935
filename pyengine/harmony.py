"""The harmony chat format of gpt-oss: render OpenAI-style messages to tokens, parse completions back.

Rendering follows openai-harmony (the byte-exact reference) token for token: every header field and
every content block is encoded as its own piece of ordinary text, with control tokens between them,
exactly where openai-harmony puts them. Parsing a completion works on token ids and lives in
pyengine.harmony_stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyengine.tokenizer import Tokenizer

MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL, ENDOFTEXT = "<|constrain|>", "<|return|>", "<|call|>", "<|endoftext|>"


@dataclass
class HarmonyMessage:
    """One harmony message: author (role, or a tool's name), header fields and text content."""

    role: str
    content: str = ""
    name: str | None = None
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _rust_lines(text: str) -> list[str]:
    """str::lines() semantics: split on LF, drop one trailing CR per line and a final empty line."""
    if text == "":
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _json_compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: Any) -> bool:
    return isinstance(schema, dict) and isinstance(schema.get("enum"), list) and len(schema["enum"]) > 0


def _default_text(schema: Mapping[str, Any]) -> str:
    default = schema["default"]
    if isinstance(default, str):
        return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
    return f"default: {_json_compact(default)}"


def _nullable(variant: Any, type_str: str) -> str:
    if isinstance(variant, dict) and variant.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _variant_comments(variant: Any, skip_desc: bool, property_desc: str | None) -> str:
    comments = []
    if isinstance(variant, dict):
        desc = variant.get("description")
        if not skip_desc and isinstance(desc, str) and desc != property_desc:
            comments.append(desc)
        if "default" in variant:
            comments.append(_default_text(variant))
    return f" // {' '.join(comments)}" if comments else ""


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """JSON schema -> the TypeScript-like type openai-harmony writes into the tool namespace."""
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | "
            out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
            out += _variant_comments(variant, False, None)
        return out
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        enum = schema.get("enum")
        if isinstance(enum, list):
            values = [f'"{v}"' for v in enum if isinstance(v, str)]
            if values:
                return " | ".join(values)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if "items" in schema:
            return f"{schema_to_typescript(schema['items'], indent)}[]"
        return "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    props = schema.get("properties")
    if isinstance(props, dict):
        required = (
            {r for r in schema.get("required", []) if isinstance(r, str)}
            if isinstance(schema.get("required"), list)
            else set()
        )
        for key, val in props.items():
            val = val if isinstance(val, dict) else {}
            optional = "" if key in required else "?"
            if isinstance(val.get("title"), str):
                out += f"{indent}// {val['title']}\n{indent}//\n"
            one_of = val.get("oneOf")
            if one_of is None and isinstance(val.get("description"), str):
                out += f"{indent}// {val['description']}\n"
            examples = val.get("examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                for ex in examples:
                    if isinstance(ex, str):
                        out += f'{indent}// - "{ex}"\n'
            if isinstance(one_of, list):
                out += _one_of_property(key, val, one_of, optional, indent)
                continue
            out += f"{indent}{key}{optional}: "
            out += _nullable(val, schema_to_typescript(val, indent + "    "))
            out += ","
            if one_of is None and "default" in val:
                out += f" {'// ' + _default_text(val)}"
            out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, val: Mapping[str, Any], one_of: list, optional: str, indent: str) -> str:
    out = ""
    property_desc = val.get("description") if isinstance(val.get("description"), str) else None
    first = one_of[0] if one_of else None
    skip = (
        property_desc is not None
        and isinstance(first, dict)
        and isinstance(first.get("description"), str)
        and first["description"] == property_desc
    )
    desc_above = False
    if not skip and property_desc is not None:
        out += f"{indent}// {property_desc}\n"
        desc_above = True
    if "default" in val:
        out += f"{indent}// {_default_text(val)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(one_of):
        out += f"{indent} | "
        out += _nullable(variant, schema_to_typescript(variant, indent + "   "))
        out += _variant_comments(variant, i == 0 and desc_above, property_desc)
        out += "\n"
    return out + f"{indent},\n"


def _tools_section(tools: Sequence[Mapping[str, Any]]) -> str:
    """The '# Tools' block with the 'functions' namespace (openai-harmony's template_tools_section)."""
    lines = ["## functions\n", "namespace functions {\n"]
    for tool in tools:
        lines.extend(f"// {line}" for line in _rust_lines(tool.get("description") or ""))
        params = tool.get("parameters")
        if params is not None:
            lines.append(f"type {tool['name']} = (_: {schema_to_typescript(params)}) => any;\n")
        else:
            lines.append(f"type {tool['name']} = () => any;\n")
    lines.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(lines)


def system_text(reasoning_effort: str, current_date: str | None, has_function_tools: bool) -> str:
    """Content of the harmony system message."""
    top = [MODEL_IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
    if current_date is not None:
        top.append(f"Current date: {current_date}")
    channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return "\n\n".join(["\n".join(top), f"Reasoning: {reasoning_effort}", channels])


def developer_text(instructions: str | None, tools: Sequence[Mapping[str, Any]]) -> str:
    """Content of the harmony developer message (instructions, then the functions namespace)."""
    sections = []
    if instructions is not None:
        sections += ["# Instructions", instructions]
    if tools:
        sections.append(_tools_section(tools))
    return "\n\n".join(sections)


def _text_of(content: Any) -> str:
    """OpenAI message content: a string, None, or a list of parts whose text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def _function_tools(tools: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for tool in tools or []:
        fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if fn is None or "name" not in fn:
            raise ValueError(f"unsupported tool definition: {tool!r}")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": fn.get("parameters")})
    return out


def to_harmony_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Iterable[Mapping[str, Any]] | None = None,
    reasoning_effort: str = "medium",
    current_date: str | None = None,
) -> list[HarmonyMessage]:
    """OpenAI chat messages -> harmony messages (system block, developer block, then the turns).

    system and developer messages become the developer instructions (joined by a blank line);
    assistant reasoning_content becomes an analysis message, tool_calls become commentary messages
    to functions.NAME with content type <|constrain|>json (content next to tool calls becomes a
    commentary preamble), other assistant content a final message; tool results are messages from
    functions.NAME to assistant on the commentary channel.
    """
    effort = str(reasoning_effort).lower()
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, not {reasoning_effort!r}")
    fn_tools = _function_tools(tools)
    instructions = [_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    out = [HarmonyMessage("system", system_text(effort, current_date, bool(fn_tools)))]
    if instructions or fn_tools:
        out.append(
            HarmonyMessage("developer", developer_text("\n\n".join(instructions) if instructions else None, fn_tools))
        )
    call_names: dict[str, str] = {}
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(HarmonyMessage("user", _text_of(m.get("content"))))
        elif role == "assistant":
            out.extend(_assistant_messages(m, call_names))
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id", ""))
            if not name:
                raise ValueError("a tool message needs a name or the tool_call_id of an earlier tool call")
            out.append(
                HarmonyMessage(
                    "tool",
                    _text_of(m.get("content")),
                    name=f"functions.{name}",
                    recipient="assistant",
                    channel="commentary",
                )
            )
        else:
            raise ValueError(f"unknown message role {role!r}")
    return out


def _assistant_messages(m: Mapping[str, Any], call_names: dict[str, str]) -> list[HarmonyMessage]:
    out = []
    reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
    if reasoning:
        out.append(HarmonyMessage("assistant", reasoning, channel="analysis"))
    content = _text_of(m.get("content"))
    calls = m.get("tool_calls") or []
    if calls:
        if content:
            out.append(HarmonyMessage("assistant", content, channel="commentary"))
        for call in calls:
            fn = call.get("function", call)
            args = fn.get("arguments", "")
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False)
            if call.get("id"):
                call_names[call["id"]] = fn["name"]
            out.append(
                HarmonyMessage(
                    "assistant",
                    args,
                    recipient=f"functions.{fn['name']}",
                    channel="commentary",
                    content_type="<|constrain|>json",
                )
            )
    elif content or not reasoning:
        out.append(HarmonyMessage("assistant", content, channel="final"))
    return out


def drop_old_analysis(messages: Sequence[HarmonyMessage]) -> list[HarmonyMessage]:
    """openai-harmony's auto_drop_analysis: when the last assistant message is a final answer,
    analysis messages before the first final message are left out."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if last_assistant is None or last_assistant.channel != "final":
        return list(messages)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    if first_final is None:
        return list(messages)
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


class HarmonyRenderer:
    """Renders harmony messages to token ids with one vocabulary's control tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids = {t: tokenizer.token_id(t) for t in (START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL)}

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_message(self, m: HarmonyMessage) -> list[int]:
        ids = [self._ids[START]]
        if m.role == "tool":
            ids += self._text(m.name or "")
        else:
            ids += self._text(m.role)
            if m.name is not None:
                ids += self._text(f":{m.name}")
        if m.recipient is not None and m.recipient != "all":
            ids += self._text(f" to={m.recipient}")
        if m.channel is not None:
            ids += [self._ids[CHANNEL], *self._text(m.channel)]
        if m.content_type is not None:
            if m.content_type.startswith(CONSTRAIN):
                rest = m.content_type[len(CONSTRAIN) :]
                ids += [*self._text(" "), self._ids[CONSTRAIN], *(self._text(rest) if rest else [])]
            else:
                ids += self._text(f" {m.content_type}")
        ids += [self._ids[MESSAGE], *self._text(m.content)]
        ids.append(self._ids[CALL] if m.role == "assistant" and m.recipient is not None else self._ids[END])
        return ids

    def render(
        self,
        messages: Sequence[HarmonyMessage],
        add_generation_prompt: bool = True,
        auto_drop_analysis: bool = True,
    ) -> list[int]:
        if auto_drop_analysis:
            messages = drop_old_analysis(messages)
        ids: list[int] = []
        for m in messages:
            ids += self.render_message(m)
        if add_generation_prompt:
            ids += [self._ids[START], *self._text("assistant")]
        return ids


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    tools: Iterable[Mapping[str, Any]] | None = None,
    reasoning_effort: str = "medium",
    current_date: str | None = None,
    add_generation_prompt: bool = True,
    auto_drop_analysis: bool = True,
) -> list[int]:
    """Prompt token ids for OpenAI-style messages, as openai-harmony renders them for completion."""
    harmony = to_harmony_messages(messages, tools, reasoning_effort, current_date)
    return HarmonyRenderer(tokenizer).render(harmony, add_generation_prompt, auto_drop_analysis)
