"""Request bodies as pydantic models and errors in the OpenAI shape.

Every validation failure becomes one `APIError` with an HTTP status and the
`{"error": {"message", "type", "code"}}` body the official openai client parses, so a bad
request is answered in one clear sentence and never reaches the scheduler."""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from pyengine.stops import MAX_STOP_CHARS, MAX_STOPS, check_stops

TEXT_PART_TYPES = ("text", "input_text", "output_text")
log = logging.getLogger("pyengine")


def _integral(value: Any) -> Any:
    """JSON Schema calls 3.0 an integer; strict validation would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]


def _nullable(schema: dict[str, Any]) -> Any:
    """The published JSON schema of an optional field whose validator checks more than its type."""
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}]})


_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_STOP = {"anyOf": [_STOP_STRING, {"type": "array", "maxItems": MAX_STOPS, "items": _STOP_STRING}]}
_LOGIT_BIAS = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "properties": {"type": {"enum": list(TEXT_PART_TYPES)}, "text": {"type": "string"}},
    "required": ["type"]}}]}
_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
# whether a schema or grammar is one the parser accepts is checked by pyengine.constrain (400 if not)
_RESPONSE_FORMAT = {"type": "object", "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]},
    "schema": {"type": ["object", "boolean"]},
    "json_schema": {"type": "object", "properties": {"schema": {"type": ["object", "boolean"]}}}}}
_TEMPLATE_KWARGS = {"type": "object", "properties": {"reasoning_effort": {"enum": ["low", "medium", "high", None]}}}
_RESPONSES_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "name"],
    "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]}
_TEXT_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]}, "schema": {"type": ["object", "boolean"]}}}
_INPUT = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]}
URL_PATTERN = r"^https?://[^\x00-\x20\x7f]+$"
DIGEST_PATTERN = r"^(sha256:)?[0-9a-fA-F]{64}$"
_PROMPT = {"anyOf": [{"type": "string", "minLength": 1},
                     {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                     {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | int | None = None, param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code if code is not None else status
        self.param = param
        self.extra = extra

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        err.update(self.extra)
        return {"error": err}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", "invalid_request_error", param)


MAX_JSON_DEPTH = 64


def _check_plain(data: Any) -> None:
    """400 for JSON nested deeper than MAX_JSON_DEPTH (later code may recurse over it) or holding a
    lone surrogate (`"\\ud800"` decodes to a str that cannot be encoded back, e.g. in an error body)."""
    todo = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"JSON in the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for text in (key, item):
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad_request("a string in the request body holds a lone UTF-16 surrogate, "
                                          "which is not text") from None
            if isinstance(item, (dict, list)):
                todo.append((item, depth + 1))


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode a JSON body into `model`, raising a 400 APIError that names the bad field."""
    try:
        data = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"Malformed JSON in request body: {e}") from None
    except RecursionError:
        raise bad_request(f"JSON in the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise bad_request("Request body must be a JSON object.")
    _check_plain(data)
    try:
        parsed = model.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        raise bad_request(f"Invalid parameter {loc}: {msg}" if loc else msg, loc) from None
    if parsed.model_extra:  # accepted, as OpenAI-compatible servers do, but never silently
        log.warning("ignoring request field(s) this node does not support: %s",
                    ", ".join(repr(k[:40]) for k in sorted(parsed.model_extra)[:20]))
    return parsed


class _Open(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_Open):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str | list[dict[str, Any]] | None, _nullable(_CONTENT)] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None

    def text(self) -> str:
        """The message's text; content parts of type "text" are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") not in TEXT_PART_TYPES:
                raise ValueError(f"content part type {part.get('type')!r} is not supported "
                                 "(this model reads text only)")
            text = part.get("text", "")
            if not isinstance(text, str):
                raise ValueError("a text content part needs a string `text`")
            parts.append(text)
        return "".join(parts)


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Open):
    include_usage: bool = False


class SamplingFields(_Open):
    """The sampler's settings every generation route takes (chat, completions, responses)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: Annotated[int, Field(ge=-1, description="-1 = random (llama.cpp)"), INTEGRAL] | None = None


class _Sampling(SamplingFields):
    """Sampling fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)
    logit_bias: Annotated[dict[str, float] | None, _nullable(_LOGIT_BIAS)] = None
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    stop: Annotated[str | list[str] | None, _nullable(_STOP)] = None
    n: Annotated[int, Field(ge=1, description="choices; at most the node's --parallel"), INTEGRAL] | None = None
    id_slot: Annotated[int, Field(ge=-1, description="the slot to run in (llama-server's; -1: the free slot "
                                                     "that reuses the most, as when absent)"), INTEGRAL] | None = None
    # constrained decoding (pyengine.constrain checks them against the parser; 400 if invalid)
    response_format: Annotated[dict[str, Any] | None, _nullable(_RESPONSE_FORMAT)] = None
    grammar: str | None = Field(None, description="GBNF grammar (llama-server); 400 if the parser refuses it")
    json_schema: dict[str, Any] | None = Field(None, description="JSON schema of the answer (llama-server)")

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """The shape the document publishes (_RESPONSE_FORMAT), on every route that takes it (the
        schema inside is the grammar parser's to judge, in pyengine.constrain)."""
        if v is None:
            return v
        if "type" in v and v["type"] not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be text, json_object or json_schema")
        if "schema" in v and not isinstance(v["schema"], (dict, bool)):
            raise ValueError("response_format.schema must be an object or a boolean")
        inner = v.get("json_schema", {})
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), (dict, bool)):
            raise ValueError("response_format.json_schema must be an object whose schema is an object or a boolean")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        check_stops([v] if isinstance(v, str) else (v or []))
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit() or int(k) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError("logit_bias values must lie in [-100, 100]")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, _nullable(_TOOL_CHOICE)] = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    chat_template_kwargs: Annotated[dict[str, Any] | None, _nullable(_TEMPLATE_KWARGS)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        effort = (self.chat_template_kwargs or {}).get("reasoning_effort")
        if effort is not None and effort not in ("low", "medium", "high"):
            raise ValueError("chat_template_kwargs.reasoning_effort must be low, medium or high")
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be none, auto, required or a function object")
        if isinstance(choice, dict) and not (choice.get("type") == "function" and isinstance(
                choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
            raise ValueError('tool_choice must be {"type": "function", "function": {"name": ...}}')
        for m in self.messages:
            m.text()
        return self

    def effort(self) -> str | None:
        """reasoning_effort, top level first, then chat_template_kwargs."""
        return self.reasoning_effort or (self.chat_template_kwargs or {}).get("reasoning_effort")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[str] | list[Int], WithJsonSchema(_PROMPT)]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None
    suffix: Annotated[str | None, _nullable({"type": "string", "maxLength": 0})] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # OpenAI's batches (several strings, or token lists [[1, 2], [3]]) are refused before the type
        # check, so the message says what is wrong rather than which arm of the union failed
        if isinstance(v, list) and v and (all(isinstance(x, list) for x in v)
                                          or (all(isinstance(x, str) for x in v) and len(v) != 1)):
            raise ValueError("only one prompt per request is supported (send one request per prompt)")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this model")
        return v


class ResponsesTool(_Open):
    """A Responses API tool: only functions (flat: name, description, parameters at the top)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function(self) -> ResponsesTool:
        if self.type != "function":
            raise ValueError(f"tool type {self.type[:40]!r} is not supported: this node runs function tools only")
        if not self.name:
            raise ValueError("a function tool needs a name")
        return self


class ResponsesReasoning(_Open):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None  # accepted; the reasoning comes whole, as reasoning_text content


class ResponsesText(_Open):
    format: Annotated[dict[str, Any] | None, _nullable(_TEXT_FORMAT)] = None

    @field_validator("format")
    @classmethod
    def _format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if v.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("text.format.type must be text, json_object or json_schema")
        if "schema" in v and not isinstance(v["schema"], (dict, bool)):
            raise ValueError("text.format.schema must be an object or a boolean")
        if v["type"] == "json_schema" and "schema" not in v:
            raise ValueError("text.format of type json_schema needs a schema (an object or a boolean)")
        return v


class ResponsesRequest(SamplingFields):
    """POST /v1/responses (OpenAI's Responses API): run as a chat request (pyengine.node.responses
    turns the input items into chat messages); input items are checked there."""

    model: str | None = None
    input: Annotated[str | list[dict[str, Any]], WithJsonSchema(_INPUT)]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    tools: list[ResponsesTool] | None = None
    tool_choice: Annotated[str | dict[str, Any] | None, _nullable(_RESPONSES_TOOL_CHOICE)] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    reasoning: ResponsesReasoning | None = None
    text: ResponsesText | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        return v

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        if self.truncation == "auto":
            raise ValueError('truncation "auto" is not supported: an input over the context is a 400 error '
                             '(truncation "disabled")')
        if self.background:
            raise ValueError("background responses are not supported: send the request and wait, or stream it")
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be none, auto, required or a function object")
        if isinstance(choice, dict) and not (choice.get("type") == "function" and isinstance(choice.get("name"), str)):
            raise ValueError('tool_choice must be {"type": "function", "name": ...}')
        return self

    def logprobs(self) -> int | None:
        """Top-logprob count of each answer token, when include asks for output_text logprobs."""
        wanted = "message.output_text.logprobs" in (self.include or [])
        return (self.top_logprobs or 0) if wanted else None


class TokenizeRequest(_Open):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Open):
    tokens: list[Annotated[int, Field(ge=0), INTEGRAL]]


class SlotFileRequest(_Open):
    """POST /slots/{id}?action=save|restore: the file in --slot-save-path (erase needs none)."""

    filename: str | None = None


class PullRequest(_Open):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["path"], "properties": {"path": {"type": "string", "minLength": 1}}},
        {"required": ["download_url"], "properties": {"download_url": {"type": "string"}}}]})
    model: str
    task_id: str | None = None
    path: str | None = None
    download_url: Annotated[str | None, _nullable({"type": "string", "pattern": URL_PATTERN})] = None
    size: Annotated[int, Field(ge=0), INTEGRAL] | None = None  # bytes, checked before the file goes live
    digest: Annotated[str | None, _nullable({"type": "string", "pattern": DIGEST_PATTERN})] = None

    @field_validator("digest")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(DIGEST_PATTERN, v):
            raise ValueError("digest must be sha256:<64 hex digits>")
        return v

    @field_validator("download_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        message = "download_url must be an http:// or https:// URL without spaces or control characters"
        if v is not None and not re.fullmatch(URL_PATTERN, v):
            raise ValueError(message)
        try:
            httpx.URL(v or "")
        except httpx.InvalidURL:
            raise ValueError(message) from None
        return v


class ApplyTemplateRequest(ChatCompletionRequest):
    """POST /apply-template takes a chat body (llama-server's route); only messages, tools,
    tool_choice and the reasoning effort matter."""
