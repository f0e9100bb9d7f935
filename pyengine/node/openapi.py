"""The node's published OpenAPI document (GET /openapi.json).

The routes read their bodies themselves (`schemas.parse_body`, so every failure is one OpenAI-shaped
400), which leaves FastAPI blind to them; this module tells it what each route accepts — the
request models of `schemas.py` — and what it answers, status by status, so clients and fuzzers
(schemathesis in the tests) see the real contract."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from pyengine.node.schemas import (
    ApplyTemplateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    PullRequest,
    ResponsesRequest,
    SlotFileRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"


class _Doc(BaseModel):
    """Response shapes are documented, not enforced: more fields may come."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Doc):
    message: str
    type: str
    code: str | int
    param: str | None = None
    n_prompt_tokens: int | None = None
    n_ctx: int | None = None


class ErrorResponse(_Doc):
    error: ErrorDetail


class PromptTokensDetails(_Doc):
    cached_tokens: int


class CompletionTokensDetails(_Doc):
    reasoning_tokens: int


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None


class ResponseToolCall(_Doc):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class AssistantMessage(_Doc):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: dict[str, float]


class Delta(_Doc):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(_Doc):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: dict[str, Any] | None


class ChatCompletionChunk(_Doc):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: dict[str, float] | None = None


class TextChoice(_Doc):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: dict[str, Any] | None


class TextCompletion(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    timings: dict[str, float]


class TextChunkChoice(_Doc):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: dict[str, Any] | None


class TextCompletionChunk(_Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | None = None
    timings: dict[str, float] | None = None


class ResponseUsage(_Doc):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(_Doc):
    """A Responses API response: output items of type reasoning, message and function_call."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponseUsage | None
    error: dict[str, str] | None
    incomplete_details: dict[str, str] | None


class ResponseEvent(_Doc):
    """One event of a streamed response (response.created ... response.completed)."""

    type: str
    sequence_number: int


class ResponseDeleted(_Doc):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class ModelEntry(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = None
    size: int | None = None


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelEntry]
    ready_models: list[int]
    initializing: bool


class HealthOk(_Doc):
    status: Literal["ok"]


class RouterLink(_Doc):
    url: str | None
    status: Literal["off", "starting", "registering", "registered", "refused", "failed"]
    node_id: str | None = None
    last_heartbeat: float | None = None
    last_heartbeat_result: str | None = None


class NodeStats(_Doc):
    window_seconds: float
    prompt_tokens: int
    generated_tokens: int
    prefill_tokens_per_second: float | None
    decode_tokens_per_second: float | None
    rss_bytes: int | None
    kv_cache_bytes: int
    kv_cache_tokens: int
    kv_cache_capacity_tokens: int
    router: RouterLink
    expert_counts: list[list[int]]


class TokenPiece(_Doc):
    id: int
    piece: str


class TokenizeResponse(_Doc):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(_Doc):
    content: str


class PullAccepted(_Doc):
    status: Literal["accepted"]


class PullState(_Doc):
    model: str
    status: Literal["running", "done", "failed"]
    progress: float
    error: str | None = None


class ModelFacts(_Doc):
    arch: str
    quantization: str
    size_bytes: int
    n_params: int


class Props(_Doc):
    """GET /props (llama-server's route; the web UI reads it)."""

    model_path: str
    model_alias: str
    aliases: list[str]
    n_ctx: int
    n_ctx_slot: int
    total_slots: int
    chat_template: str
    build_info: dict[str, str]
    device: str
    n_threads: int
    cache_type_k: str
    cache_type_v: str
    model: ModelFacts
    webui: bool


class SlotState(_Doc):
    id: int
    n_ctx: int
    is_processing: bool
    n_prompt_tokens_cached: int
    n_decoded: int


class AppliedTemplate(_Doc):
    prompt: str


class SlotAction(_Doc):
    """POST /slots/{id_slot}: save (n_saved, n_written, timings.save_ms), restore (n_restored,
    n_read, timings.restore_ms) or erase (n_erased), as llama-server answers them."""

    id_slot: int
    filename: str | None = None
    n_saved: int | None = None
    n_written: int | None = None
    n_restored: int | None = None
    n_read: int | None = None
    n_erased: int | None = None
    timings: dict[str, float] | None = None


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {400: "Invalid request (malformed JSON, a bad parameter, or a prompt over the context)",
           401: "Missing or wrong API key (only with --api-key)",
           403: "A path pull outside the folders this node copies from (--pull-source)",
           404: "The request names a model this node does not serve, or a response it does not hold",
           409: "A pull of this model id is already running",
           413: "The request body is larger than the node's limit (--max-body-mb)",
           500: "Generation failed for this request (or a slot file could not be written)",
           501: "Slot files are off (no --slot-save-path), or this device's KV cache cannot be read back",
           503: "The model is loading, the queue is full, or the node is shutting down"}
    return {str(s): {"description": why[s], "content": _json(ErrorResponse)} for s in statuses}


def _sse(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: the schema of an event stream describes each event):
    `data:` a JSON chunk, an error object (generation failed or the node stops), or `[DONE]`."""
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}},
        "description": "`data: {chunk}` events, then `data: [DONE]` (when `stream` is true)"}}}


def _sse_events() -> dict[str, Any]:
    """A streamed response's events: `event:` its type, `data:` the event as JSON; no [DONE]."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"$ref": REF.format(model="ResponseEvent")}}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string"}, "data": payload},
        "description": "`event: TYPE` / `data: {event}` pairs, ending with response.completed, "
                       "response.incomplete or response.failed (when `stream` is true)"}}}


def _ok(description: str, content: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"200": {"description": description, "content": content}, **_errors(*errors)}


GENERATION_ERRORS = (400, 401, 404, 413, 500, 503)
# (path, method) -> (request body model or None, {status: response object})
ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | None, dict[str, Any]]] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, _ok(
        "A chat completion, or its SSE stream", {**_json(ChatCompletion), **_sse(ChatCompletionChunk)},
        *GENERATION_ERRORS)),
    ("/v1/completions", "post"): (CompletionRequest, _ok(
        "A text completion, or its SSE stream", {**_json(TextCompletion), **_sse(TextCompletionChunk)},
        *GENERATION_ERRORS)),
    ("/v1/responses", "post"): (ResponsesRequest, _ok(
        "A response (OpenAI's Responses API), or its SSE stream of events",
        {**_json(ResponseObject), **_sse_events()}, *GENERATION_ERRORS)),
    ("/v1/responses/{response_id}", "get"): (None, _ok("A stored response", _json(ResponseObject), 401, 404)),
    ("/v1/responses/{response_id}", "delete"): (None, _ok("The stored response is deleted", _json(ResponseDeleted),
                                                          401, 404)),
    ("/v1/models", "get"): (None, _ok("The loaded model", _json(ModelList), 401)),
    ("/health", "get"): (None, _ok("Ready", _json(HealthOk), 503)),
    ("/v1/health", "get"): (None, _ok("Ready", _json(HealthOk), 503)),
    ("/metrics", "get"): (None, _ok("Prometheus text exposition",
                                    {"text/plain": {"schema": {"type": "string"}}}, 401)),
    ("/v1/node/stats", "get"): (None, _ok("Live figures for the web page's status view", _json(NodeStats), 401)),
    ("/tokenize", "post"): (TokenizeRequest, _ok("Token ids (with pieces if asked)", _json(TokenizeResponse),
                                                 400, 401, 413, 503)),
    ("/detokenize", "post"): (DetokenizeRequest, _ok("The text of the tokens", _json(DetokenizeResponse),
                                                     400, 401, 413, 503)),
    ("/pull", "post"): (PullRequest, _ok("The copy or download started", _json(PullAccepted),
                                         400, 401, 403, 409, 413)),
    ("/pull/{model}", "get"): (None, _ok("The state of the last pull of this model id", _json(PullState),
                                         401, 404)),
    ("/props", "get"): (None, _ok("The model, context, slots, template and build", _json(Props), 401, 503)),
    ("/slots", "get"): (None, _ok("Each slot's state", {"application/json": {"schema": {
        "type": "array", "items": {"$ref": REF.format(model="SlotState")}}}}, 401, 503)),
    ("/apply-template", "post"): (ApplyTemplateRequest, _ok("The prompt text the chat renders to",
                                                            _json(AppliedTemplate), 400, 401, 413, 503)),
    ("/v1/models/{model_id}", "get"): (None, _ok("One model", _json(ModelEntry), 401, 404)),
    ("/slots/{id_slot}", "post"): (SlotFileRequest, _ok(
        "The slot was saved to, restored from or erased (`action` = save, restore or erase; save and restore "
        "name a `filename` in --slot-save-path)", _json(SlotAction), 400, 401, 413, 500, 501, 503)),
}
OPTIONAL_BODIES = {("/slots/{id_slot}", "post")}  # erase takes no body
# llama-server's and OpenAI's un-prefixed spellings of the same operations
ALIASES = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions",
           "/responses": "/v1/responses", "/responses/{response_id}": "/v1/responses/{response_id}",
           "/models": "/v1/models", "/models/{model_id}": "/v1/models/{model_id}"}
ROUTES.update({(alias, method): ROUTES[(path, method)] for (path, method) in list(ROUTES)
               for alias, target in ALIASES.items() if target == path})
RESPONSE_MODELS = (ErrorResponse, ChatCompletion, ChatCompletionChunk, TextCompletion, TextCompletionChunk,
                   ResponseObject, ResponseEvent, ResponseDeleted,
                   ModelList, ModelEntry, HealthOk, NodeStats, TokenizeResponse, DetokenizeResponse, PullAccepted,
                   PullState, Props, SlotState, AppliedTemplate, SlotAction)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app`'s routes with the bodies and responses of ROUTES filled in."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API of one gpt-oss model (pyengine).")
    requests = {m for m, _ in ROUTES.values() if m}
    _, defs = models_json_schema([(m, "validation") for m in requests] +
                                 [(m, "serialization") for m in RESPONSE_MODELS], ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for (path, method), (body, responses) in ROUTES.items():
        op = doc["paths"][path][method]
        op["responses"] = responses
        if body:
            op["requestBody"] = {"required": (path, method) not in OPTIONAL_BODIES, "content": _json(body)}
    return doc


def install(app: FastAPI) -> None:
    """Make `app` publish build_openapi(app) at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
