"""The OpenAI-compatible routes of the node, as one ASGI app.

Handlers validate, render the prompt through the backend, hand a `Job` to the scheduler and turn
its events into OpenAI JSON or SSE chunks with pyengine.openai_output (the library's shaping too). The model loads on a background thread so /health can
answer 503 while it loads; the router client starts once the app serves."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyengine import __version__, constrain
from pyengine.node import openapi
from pyengine.core import Event
from pyengine.node.backend import Backend
from pyengine.node.config import NodeConfig
from pyengine.node.metrics import Metrics
from pyengine.node.scheduler import Done, Failed, Job, QueueFull, Scheduler, ShuttingDown
from pyengine.openai_output import ChatOutput, TextOutput
from pyengine.node.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    PullRequest,
    TokenizeRequest,
    bad_request,
    parse_body,
)
from pyengine.sampling import SamplingParams

log = logging.getLogger("pyengine")
FINGERPRINT = f"pyengine-{__version__}"
OPEN_PATHS = ("/health", "/v1/health")


class NodeState:
    """The loaded model and its scheduler, or why they are not there (yet)."""

    def __init__(self, config: NodeConfig, load_backend: Callable[[], Backend]) -> None:
        self.config = config
        self.load_backend = load_backend
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.on_load_error: Callable[[str], None] = lambda message: None
        self.response_ms: collections.deque[float] = collections.deque(maxlen=100)

    def load(self) -> None:
        try:
            backend = self.load_backend()
            self.scheduler = Scheduler(backend, self.config.parallel, self.config.max_queue,
                                       self.metrics, self.config.verbose)
            self.backend = backend
            self._gauges(self.scheduler)
        except Exception as e:  # noqa: BLE001 - any load failure is reported on /health and ends the CLI
            self.load_error = str(e)
            log.error("%s", e)
            self.on_load_error(str(e))

    def _gauges(self, s: Scheduler) -> None:
        m = self.metrics
        m.expert_counts = s.backend.expert_counts
        capacity = s.n_parallel * s.n_ctx
        m.gauge("queue_depth", "Requests waiting for a slot.", s.queue_depth)
        m.gauge("requests_processing", "Requests holding a slot.", s.n_active)
        m.gauge("slots_total", "Sequence slots (--parallel).", lambda: s.n_parallel)
        m.gauge("kv_cache_tokens", "Tokens held in the KV caches of all slots.", s.kv_tokens)
        m.gauge("kv_cache_usage_ratio", "Share of all slots' KV capacity in use.", lambda: s.kv_tokens() / capacity)

    def model_name(self) -> str:
        if self.backend:
            return self.backend.info.name
        return self.config.model.rsplit("/", 1)[-1].removesuffix(".gguf")

    def ready(self) -> tuple[Backend, Scheduler]:
        if self.load_error:
            raise APIError(503, f"model failed to load: {self.load_error}", "unavailable_error")
        if self.backend is None or self.scheduler is None:
            raise APIError(503, "Loading model", "unavailable_error")
        return self.backend, self.scheduler

    def active_requests(self) -> int:
        s = self.scheduler
        return s.n_active() + s.queue_depth() if s else 0

    def average_response_ms(self) -> float:
        recent = list(self.response_ms)
        return sum(recent) / len(recent) if recent else 0.0

    def shutdown(self, wait: bool = True) -> None:
        """End every running and waiting request with an error; with `wait`, join the worker."""
        if self.scheduler:
            self.scheduler.shutdown(timeout=10.0 if wait else 0.0)


class RequestIdAndAuth:
    """ASGI middleware: echo or mint X-Request-Id on every response; check the API key."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        if self.api_key and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                err = APIError(401, "Invalid API key", "authentication_error", "invalid_api_key")
                return await JSONResponse(err.body(), 401)(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)


def _sampling(req: Any, n_vocab: int) -> SamplingParams:
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    if any(t >= n_vocab for t in bias):
        raise bad_request(f"logit_bias names a token id outside the vocabulary (0..{n_vocab - 1})",
                          "logit_bias")
    given = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p",
                                                    "presence_penalty", "frequency_penalty", "seed")}
    given["repeat_penalty"] = req.repetition_penalty or req.repeat_penalty
    if given["seed"] == -1:
        given["seed"] = None
    try:
        return SamplingParams(logit_bias=bias, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise bad_request(f"Invalid sampling parameters: {e}") from None


def _constraint(backend: Backend, req: Any, tools: list[dict[str, Any]] | None = None,
                tool_choice: Any = None) -> constrain.Spec | None:
    """The request's constraint (response_format, grammar, json_schema, a required tool call),
    checked by the grammar parser: its message in a 400 when invalid."""
    try:
        return constrain.request_spec(backend.tokenizer, response_format=req.response_format, grammar=req.grammar,
                                      json_schema=req.json_schema, tools=tools, tool_choice=tool_choice)
    except constrain.SpecError as e:
        raise bad_request(str(e), e.param) from None


def _is_file(path: str) -> bool:
    """A regular file (not /dev/zero, not a folder); False for names the OS refuses outright."""
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, an unknown ~user
        return False


def _history(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages in the backend's normalised shape (see Backend.render_chat)."""
    out = []
    for m in messages:
        calls = None
        if m.tool_calls:
            calls = [{"id": c.id, "name": c.function.name,
                      "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                      else json.dumps(c.function.arguments)} for c in m.tool_calls]
        role = "tool" if m.role == "function" else m.role
        out.append({"role": role, "content": m.text(),
                    "thinking": m.reasoning_content or m.reasoning or m.thinking,
                    "tool_calls": calls, "tool_call_id": m.tool_call_id, "name": m.name})
    return out


def create_app(config: NodeConfig, load_backend: Callable[[], Backend],
               start_router: Callable[[NodeState], Any] | None = None) -> FastAPI:
    """The node's ASGI app; `load_backend` runs on a thread at startup, `start_router(state)`
    (a coroutine function) as a task while the app serves. `app.state.node` is the NodeState."""
    state = NodeState(config, load_backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="pyengine-load", daemon=True).start()
        router_task = asyncio.create_task(start_router(state)) if start_router else None
        try:
            yield
        finally:
            if router_task:
                router_task.cancel()
            await run_in_threadpool(state.shutdown)
            worker_done = state.scheduler is None or not state.scheduler.thread.is_alive()
            if state.backend and worker_done:  # never unmap weights under a running step
                state.backend.close()

    app = FastAPI(title="pyengine node", version=__version__, lifespan=lifespan)
    app.state.node = state
    app.add_middleware(RequestIdAndAuth, api_key=config.api_key)
    openapi.install(app)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {e}", "server_error").body(), 500)

    def check_model(model: str | None, backend: Backend) -> None:
        if not backend.info.answers_to(model):
            raise APIError(404, f"The model `{model}` does not exist; this node serves "
                           f"`{backend.info.name}`", "invalid_request_error", "model_not_found", "model")

    def make_job(request: Request, prompt: list[int], req: Any, params: SamplingParams, chat: bool,
                 limit: int | None, endpoint: str, logprobs: int | None, prompt_logprobs: bool = False,
                 constraint: constrain.Spec | None = None) -> Job:
        backend, scheduler = state.ready()
        n_ctx = backend.info.n_ctx
        if len(prompt) >= n_ctx:
            raise APIError(400, f"the request exceeds the available context size ({len(prompt)} prompt "
                           f"tokens, context {n_ctx}); shorten it or start the node with a larger --ctx-size",
                           "exceed_context_size_error", "exceed_context_size_error",
                           n_prompt_tokens=len(prompt), n_ctx=n_ctx)
        room = n_ctx - len(prompt)
        job = Job(prompt=prompt, params=params, chat=chat, max_tokens=min(limit or room, room),
                  stops=req.stop_list(), endpoint=endpoint, loop=asyncio.get_running_loop(), logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs, constraint=constraint,
                  request_id=request.scope["state"]["request_id"])
        try:
            scheduler.submit(job)
        except (QueueFull, ShuttingDown) as e:
            state.metrics.count_request(endpoint, "rejected")
            raise APIError(503, str(e), "unavailable_error") from None
        return job

    async def next_event(request: Request, job: Job, poll: bool) -> list[Event] | Done | Failed:
        """The job's next event; when `poll`, notice a vanished client meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), 1.0)
            except asyncio.TimeoutError:
                if poll and await request.is_disconnected():
                    raise asyncio.CancelledError from None

    async def collect(request: Request, job: Job, out: ChatOutput | TextOutput) -> Done:
        """Feed every step's events to `out` until the job is done."""
        try:
            while True:
                ev = await next_event(request, job, poll=True)
                if isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message, ev.type)
                if isinstance(ev, Done):
                    return ev
                out.chunk(ev)
        finally:
            state.scheduler.withdraw(job)

    def sse(payload: dict[str, Any] | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def stream(request: Request, job: Job, out: ChatOutput | TextOutput, include_usage: bool,
               t0: float) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                head = out.head()
                if head:
                    yield sse(head)
                while True:
                    ev = await next_event(request, job, poll=False)
                    if isinstance(ev, list):
                        payload = out.chunk(ev)
                        if payload:
                            yield sse(payload)
                        continue
                    if isinstance(ev, Failed):
                        yield sse({"error": {"message": ev.message, "type": ev.type, "code": ev.status}})
                    else:
                        state.response_ms.append((time.perf_counter() - t0) * 1e3)
                        for payload in out.tail(ev.finished, include_usage, timings=ev.timings):
                            yield sse(payload)
                    yield sse("[DONE]")
                    return
            finally:
                state.scheduler.withdraw(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    extra = {"system_fingerprint": FINGERPRINT}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req = parse_body(await request.body(), ChatCompletionRequest)
        backend, _ = state.ready()
        check_model(req.model, backend)
        params = _sampling(req, backend.info.n_vocab)
        tools = None
        if req.tools and req.tool_choice != "none":
            tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
        try:
            prompt = await run_in_threadpool(backend.render_chat, _history(req.messages), tools, req.effort())
        except ValueError as e:
            raise bad_request(f"cannot render these messages: {e}", "messages") from None
        spec = await run_in_threadpool(_constraint, backend, req, tools, req.tool_choice)
        job = make_job(request, prompt, req, params, True, req.token_limit(), "chat",
                       (req.top_logprobs or 0) if req.logprobs else None, constraint=spec)
        out = ChatOutput(backend.tokenizer, backend.info.name, bool(req.logprobs), extra, reasoning_alias=True)
        if req.stream:
            return stream(request, job, out, req.include_usage(), t0)
        done = await collect(request, job, out)
        state.response_ms.append((time.perf_counter() - t0) * 1e3)
        return JSONResponse(out.result(done.finished, timings=done.timings))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req = parse_body(await request.body(), CompletionRequest)
        backend, _ = state.ready()
        check_model(req.model, backend)
        params = _sampling(req, backend.info.n_vocab)
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
            prompt = list(req.prompt)
            if any(not 0 <= t < backend.info.n_vocab for t in prompt):
                raise bad_request(f"prompt token ids must lie in 0..{backend.info.n_vocab - 1}", "prompt")
        else:
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            prompt = await run_in_threadpool(backend.tokenize, text, True)
            if not prompt:
                raise bad_request("prompt must not be empty", "prompt")
        spec = await run_in_threadpool(_constraint, backend, req)
        job = make_job(request, prompt, req, params, False, req.max_tokens or 16, "completions", req.logprobs,
                       prompt_logprobs=bool(req.echo) and req.logprobs is not None, constraint=spec)
        echo = await run_in_threadpool(backend.detokenize, prompt) if req.echo else ""
        out = TextOutput(backend.tokenizer, backend.info.name, echo, bool(req.echo), req.logprobs is not None, extra)
        if req.stream:
            return stream(request, job, out, req.include_usage(), t0)
        done = await collect(request, job, out)
        state.response_ms.append((time.perf_counter() - t0) * 1e3)
        return JSONResponse(out.result(done.finished, timings=done.timings))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        backend = state.backend
        entry: dict[str, Any] = {"id": state.model_name(), "object": "model", "created": 0,
                                 "owned_by": "pyengine"}
        if backend:
            info = backend.info
            entry.update(context_length=info.n_ctx, size=info.size_bytes, aliases=list(info.aliases),
                         meta={"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                               "n_params": info.n_params, "size": info.size_bytes})
        return JSONResponse({"object": "list", "data": [entry], "ready_models": [int(backend is not None), 1],
                             "initializing": backend is None and not state.load_error})

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        try:
            state.ready()
        except APIError as e:
            return JSONResponse(e.body(), e.status)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = parse_body(await request.body(), TokenizeRequest)
        backend, _ = state.ready()
        ids = await run_in_threadpool(backend.tokenize, req.content, req.parse_special)
        if req.with_pieces:
            return JSONResponse({"tokens": [{"id": t, "piece": backend.detokenize([t])} for t in ids]})
        return JSONResponse({"tokens": ids})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse_body(await request.body(), DetokenizeRequest)
        backend, _ = state.ready()
        if any(not 0 <= t < backend.info.n_vocab for t in req.tokens):
            raise bad_request(f"token ids must lie in 0..{backend.info.n_vocab - 1}", "tokens")
        return JSONResponse({"content": await run_in_threadpool(backend.detokenize, req.tokens)})

    @app.post("/pull")
    async def pull(request: Request) -> JSONResponse:
        from pyengine.node.pull import start_pull

        req = parse_body(await request.body(), PullRequest)
        if not req.path and not req.download_url:
            raise bad_request("pull needs a path or a download_url", "path")
        if req.path and not await run_in_threadpool(_is_file, req.path):
            raise bad_request(f"path {req.path!r} is not a readable file on this node", "path")
        try:
            start_pull(req, config)
        except ValueError as e:
            raise bad_request(str(e), "model") from None
        return JSONResponse({"status": "accepted"})

    return app
