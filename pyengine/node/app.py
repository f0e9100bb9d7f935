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
from pyengine.node import choices, cors, llama_routes, openapi, responses, slot_files, webui
from pyengine.core import Event
from pyengine.node.backend import Backend
from pyengine.node.config import NodeConfig
from pyengine.node.metrics import Metrics
from pyengine.node.pull import PullRefused, Pulls, clean_leftovers
from pyengine.node.prompt_cache import PromptCache
from pyengine.node.responses_output import ResponseOutput
from pyengine.node.scheduler import Done, Failed, Job, QueueFull, Scheduler, ShuttingDown
from pyengine.openai_output import ChatOutput, TextOutput
from pyengine.node.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    PullRequest,
    ResponsesRequest,
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
        self.router: Any = None  # the RouterClient, while one runs (pyengine.node.router_client)

    def load(self) -> None:
        try:
            backend = self.load_backend()
            self.scheduler = Scheduler(backend, self.config.parallel, self.config.max_queue,
                                       self.metrics, self.config.verbose, self._prompt_cache(backend))
            self.backend = backend
            self._gauges(self.scheduler)
        except Exception as e:  # noqa: BLE001 - any load failure is reported on /health and ends the CLI
            self.load_error = str(e)
            log.error("%s", e)
            self.on_load_error(str(e))

    def _prompt_cache(self, backend: Backend) -> PromptCache | None:
        """The host-memory prompt cache of --cache-ram (None when 0)."""
        try:
            from pyengine.engine import available_memory
        except ImportError:  # a build without the compiled core
            available = None
        else:
            available = available_memory()
        limit = self.config.prompt_cache_bytes(available, backend.info.size_bytes)
        return PromptCache(backend.core.runner, limit) if limit > 0 else None

    def _gauges(self, s: Scheduler) -> None:
        m = self.metrics
        m.expert_counts = s.backend.expert_counts
        capacity = s.n_parallel * s.n_ctx
        m.gauge("queue_depth", "Requests waiting for a slot.", s.queue_depth)
        m.gauge("requests_processing", "Requests holding a slot.", s.n_active)
        m.gauge("slots_total", "Sequence slots (--parallel).", lambda: s.n_parallel)
        m.gauge("kv_cache_tokens", "Tokens held in the KV caches of all slots.", s.kv_tokens)
        m.gauge("kv_cache_usage_ratio", "Share of all slots' KV capacity in use.", lambda: s.kv_tokens() / capacity)
        if s.prompt_cache is not None:
            pc = s.prompt_cache
            m.gauge("prompt_cache_bytes", "Bytes of slot contents kept in host memory (--cache-ram).", lambda: pc.nbytes)
            m.gauge("prompt_cache_entries", "Slot contents kept in host memory.", lambda: len(pc.entries))
            m.gauge("prompt_cache_restores", "Saved slot contents written back into a slot, since start.",
                    lambda: pc.restored)

    def model_name(self) -> str:
        """The id replies carry: the first --alias, else the model's name."""
        if self.config.aliases:
            return self.config.aliases[0]
        if self.backend:
            return self.backend.info.name
        return self.config.model.rsplit("/", 1)[-1].removesuffix(".gguf")

    def model_ids(self) -> list[str]:
        """The ids /v1/models lists: every --alias, else the model's name."""
        return list(self.config.aliases) or [self.model_name()]

    def answers_to(self, model: str | None) -> bool:
        """True when a request's `model` names this node's model (an alias or one of its names)."""
        if model and model.strip().lower() in (a.lower() for a in self.config.aliases):
            return True
        return self.backend.info.answers_to(model) if self.backend else not model

    def model_entry(self, model_id: str) -> dict[str, Any]:
        """One /v1/models entry."""
        entry: dict[str, Any] = {"id": model_id, "object": "model", "created": 0, "owned_by": "pyengine"}
        if self.backend:
            info = self.backend.info
            entry.update(context_length=info.n_ctx, size=info.size_bytes,
                         aliases=[n for n in dict.fromkeys((*self.model_ids(), info.name, *info.aliases))
                                  if n != model_id],
                         meta={"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                               "n_params": info.n_params, "size": info.size_bytes})
        return entry

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


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this node's limit of {limit} bytes "
                         "(--max-body-mb)", "invalid_request_error", "request_too_large")


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length before any of it is
    read, or (chunked bodies) as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse(BodyTooLarge(self.limit).body(), 413)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class ClientGone(Exception):
    """The client of a non-streamed request went away before its answer was ready."""


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

        if self.api_key and scope["path"] not in OPEN_PATHS and not webui.is_page_path(scope["path"]):
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


async def render_chat(backend: Backend, req: ChatCompletionRequest) -> tuple[list[int], list[dict[str, Any]] | None]:
    """A chat body's prompt token ids and the tools it renders (none with tool_choice "none"); a
    message the renderer refuses is a 400. Shared by the chat route and /apply-template."""
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.function.model_dump(exclude_none=True) for t in req.tools]
    try:
        prompt = await run_in_threadpool(backend.render_chat, _history(req.messages), tools, req.effort())
    except ValueError as e:
        raise bad_request(f"cannot render these messages: {e}", "messages") from None
    return prompt, tools


def create_app(config: NodeConfig, load_backend: Callable[[], Backend],
               start_router: Callable[[NodeState], Any] | None = None) -> FastAPI:
    """The node's ASGI app; `load_backend` runs on a thread at startup, `start_router(state)`
    (a coroutine function) as a task while the app serves. `app.state.node` is the NodeState."""
    state = NodeState(config, load_backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(clean_leftovers, config.models_dir)
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
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestIdAndAuth, api_key=config.api_key)
    app.add_middleware(cors.Cors, origins=config.cors_origins)  # outermost: preflights skip the key check
    openapi.install(app)
    webui.install(app, state, config.webui)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), e.status_code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        log.info("client disconnected before the answer to %s %s (request %s); generation stopped",
                 request.method, request.url.path, request.scope["state"]["request_id"])
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {e}", "server_error").body(), 500)

    def check_model(model: str | None, backend: Backend) -> None:
        if not state.answers_to(model):
            raise APIError(404, f"The model `{model}` does not exist; this node serves "
                           f"`{state.model_name()}`", "invalid_request_error", "model_not_found", "model")

    def make_jobs(request: Request, prompt: list[int], req: Any, params: SamplingParams, chat: bool,
                  limit: int | None, endpoint: str, logprobs: int | None, prompt_logprobs: bool = False,
                  constraint: constrain.Spec | None = None) -> list[Job]:
        """One job per choice (`n`), submitted as one group; the others follow the first's prompt."""
        backend, scheduler = state.ready()
        n_ctx = backend.info.n_ctx
        if len(prompt) >= n_ctx:
            raise APIError(400, f"the request exceeds the available context size ({len(prompt)} prompt "
                           f"tokens, context {n_ctx}); shorten it or start the node with a larger --ctx-size",
                           "exceed_context_size_error", "exceed_context_size_error",
                           n_prompt_tokens=len(prompt), n_ctx=n_ctx)
        n = req.n or 1
        if n > scheduler.n_parallel:
            raise bad_request(f"n={n} choices need {n} slots; this node has {scheduler.n_parallel} "
                              "(start it with a larger --parallel)", "n")
        pinned = req.id_slot if req.id_slot is not None and req.id_slot >= 0 else None
        if pinned is not None and (pinned >= scheduler.n_parallel or n > 1):
            raise bad_request(f"id_slot {pinned} is not a slot of this node (0..{scheduler.n_parallel - 1})"
                              if n == 1 else "id_slot takes one slot; it cannot go with n > 1", "id_slot")
        room = n_ctx - len(prompt)
        jobs: list[Job] = []
        for i in range(n):
            jobs.append(Job(prompt=prompt, params=choices.choice_params(params, i), chat=chat,
                            max_tokens=min(limit or room, room), stops=req.stop_list(), endpoint=endpoint,
                            loop=asyncio.get_running_loop(), logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint,
                            request_id=request.scope["state"]["request_id"], slot=pinned,
                            leader=jobs[0] if i and not prompt_logprobs else None))
        try:
            scheduler.submit(jobs[0], jobs[1:])
        except (QueueFull, ShuttingDown) as e:
            state.metrics.count_request(endpoint, "rejected")
            raise APIError(503, str(e), "unavailable_error") from None
        return jobs

    async def next_event(request: Request, job: Job, poll: bool) -> list[Event] | Done | Failed:
        """The job's next event; when `poll`, notice a vanished client meanwhile (checked every
        0.25 s: a client that leaves while its request waits for a slot is noticed before a
        short busy request ends and the slot would run it for no one)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), 0.25)
            except asyncio.TimeoutError:
                if poll and await request.is_disconnected():
                    raise ClientGone from None

    async def collect_one(request: Request, job: Job, out: ChatOutput | TextOutput) -> Done:
        """Feed every step's events to `out` until the job is done."""
        while True:
            ev = await next_event(request, job, poll=True)
            if isinstance(ev, Failed):
                raise APIError(ev.status, ev.message, ev.type)
            if isinstance(ev, Done):
                return ev
            out.chunk(ev)

    async def collect(request: Request, jobs: list[Job], outs: list[ChatOutput | TextOutput]) -> dict[str, Any]:
        """The non-streamed answer of all choices."""
        tasks = [asyncio.ensure_future(collect_one(request, j, o)) for j, o in zip(jobs, outs)]
        try:
            dones = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one choice failed: the others stop too
                task.cancel()
            for job in jobs:
                state.scheduler.withdraw(job)
        return choices.merge_results(outs, list(dones))

    def sse(payload: dict[str, Any] | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def stream(request: Request, jobs: list[Job], outs: list[ChatOutput | TextOutput], include_usage: bool,
               t0: float) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                for out in outs:
                    head = out.head()
                    if head:
                        yield sse(head)
                fins = []
                async for i, ev in choices.merged_events(jobs):
                    if isinstance(ev, list):
                        payload = outs[i].chunk(ev)
                        if payload:
                            yield sse(payload)
                    elif isinstance(ev, Failed):
                        yield sse({"error": {"message": ev.message, "type": ev.type, "code": ev.status}})
                    else:
                        fins.append(ev.finished)
                        for payload in outs[i].tail(ev.finished, timings=ev.timings):
                            yield sse(payload)
                if len(fins) == len(jobs):
                    state.response_ms.append((time.perf_counter() - t0) * 1e3)
                    if include_usage:
                        yield sse(outs[0].tail(choices.total(fins), True)[-1])
                yield sse("[DONE]")
            finally:
                for job in jobs:
                    state.scheduler.withdraw(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def respond(request: Request, req: Any, jobs: list[Job], outs: list[ChatOutput | TextOutput],
                      t0: float) -> Response:
        """The choices' answer, as the request asked: streamed as server-sent events, or collected
        into one JSON body."""
        choices.share_identity(outs)
        if req.stream:
            return stream(request, jobs, outs, req.include_usage(), t0)
        result = await collect(request, jobs, outs)
        state.response_ms.append((time.perf_counter() - t0) * 1e3)
        return JSONResponse(result)

    extra = {"system_fingerprint": FINGERPRINT}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req = parse_body(await request.body(), ChatCompletionRequest)
        backend, _ = state.ready()
        check_model(req.model, backend)
        params = _sampling(req, backend.info.n_vocab)
        prompt, tools = await render_chat(backend, req)
        spec = await run_in_threadpool(_constraint, backend, req, tools, req.tool_choice)
        jobs = make_jobs(request, prompt, req, params, True, req.token_limit(), "chat",
                         (req.top_logprobs or 0) if req.logprobs else None, constraint=spec)
        outs = [ChatOutput(backend.tokenizer, state.model_name(), bool(req.logprobs), extra, reasoning_alias=True,
                           index=i) for i in range(len(jobs))]
        return await respond(request, req, jobs, outs, t0)

    @app.post("/v1/completions")
    @app.post("/completions")
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
        jobs = make_jobs(request, prompt, req, params, False, req.max_tokens or 16, "completions", req.logprobs,
                         prompt_logprobs=bool(req.echo) and req.logprobs is not None, constraint=spec)
        echo = await run_in_threadpool(backend.detokenize, prompt) if req.echo else ""
        outs = [TextOutput(backend.tokenizer, state.model_name(), echo, bool(req.echo), req.logprobs is not None,
                           extra, index=i) for i in range(len(jobs))]
        return await respond(request, req, jobs, outs, t0)

    stored = responses.ResponseStore()
    # chat parameter names in errors -> the Responses request's own
    responses_param = {"response_format": "text", "max_completion_tokens": "max_output_tokens", "messages": "input",
                       "logprobs": "include"}

    def responses_echo(req: ResponsesRequest, chat: ChatCompletionRequest) -> dict[str, Any]:
        """The request's settings a response object repeats."""
        fmt = req.text.format if req.text and req.text.format else {"type": "text"}
        return {"instructions": req.instructions, "previous_response_id": req.previous_response_id,
                "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
                "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls is not False,
                "temperature": req.temperature, "top_p": req.top_p, "max_output_tokens": req.max_output_tokens,
                "reasoning": {"effort": chat.effort() or "medium", "summary": None}, "text": {"format": fmt},
                "metadata": req.metadata or {}, "store": req.store, "truncation": "disabled",
                "top_logprobs": req.top_logprobs, "background": False}

    def sse_event(event: dict[str, Any]) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    @app.post("/v1/responses")
    @app.post("/responses")
    async def responses_create(request: Request) -> Response:
        t0 = time.perf_counter()
        req = parse_body(await request.body(), ResponsesRequest)
        backend, _ = state.ready()
        check_model(req.model, backend)
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            history = stored.messages(req.previous_response_id)
            if history is None:
                raise APIError(404, f"Previous response with id {req.previous_response_id[:100]!r} not found "
                               "(responses are kept in this node's memory while it runs, and only with store: true)",
                               "invalid_request_error", "previous_response_not_found", "previous_response_id")
        try:
            chat, conversation = responses.chat_request(req, history)
            params = _sampling(chat, backend.info.n_vocab)
            prompt, tools = await render_chat(backend, chat)
            spec = await run_in_threadpool(_constraint, backend, chat, tools, chat.tool_choice)
            job, = make_jobs(request, prompt, chat, params, True, chat.token_limit(), "responses",
                             (chat.top_logprobs or 0) if chat.logprobs else None, constraint=spec)
        except APIError as e:
            e.param = responses_param.get(e.param or "", e.param)
            raise
        out = ResponseOutput(backend.tokenizer, state.model_name(), responses_echo(req, chat), bool(chat.logprobs))

        def finish(obj: dict[str, Any]) -> None:
            state.response_ms.append((time.perf_counter() - t0) * 1e3)
            if req.store:
                stored.put(obj, conversation + responses.output_messages(*out.answer()))

        if not req.stream:
            try:
                done = await collect_one(request, job, out)
            finally:
                state.scheduler.withdraw(job)
            obj = out.result(done.finished)
            finish(obj)
            return JSONResponse(obj)

        async def events() -> AsyncIterator[str]:
            try:
                for event in out.head():
                    yield sse_event(event)
                async for _, ev in choices.merged_events([job]):
                    if isinstance(ev, list):
                        for event in out.chunk(ev):
                            yield sse_event(event)
                    elif isinstance(ev, Failed):
                        yield sse_event(out.failed(ev.message, ev.type))
                    else:
                        for event in out.tail(ev.finished):
                            yield sse_event(event)
                        finish(event["response"])
            finally:
                state.scheduler.withdraw(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/responses/{response_id}")
    @app.get("/responses/{response_id}")
    async def responses_get(response_id: str) -> JSONResponse:
        obj = stored.response(response_id)
        if obj is None:
            raise APIError(404, f"No response with id {response_id[:100]!r} is stored on this node",
                           "not_found_error", "response_not_found", "response_id")
        return JSONResponse(obj)

    @app.delete("/v1/responses/{response_id}")
    @app.delete("/responses/{response_id}")
    async def responses_delete(response_id: str) -> JSONResponse:
        if not stored.delete(response_id):
            raise APIError(404, f"No response with id {response_id[:100]!r} is stored on this node",
                           "not_found_error", "response_not_found", "response_id")
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> JSONResponse:
        backend = state.backend
        return JSONResponse({"object": "list", "data": [state.model_entry(m) for m in state.model_ids()],
                             "ready_models": [int(backend is not None), 1],
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

    pulls = Pulls(config)
    llama_routes.install(app, state, render_chat)
    slot_files.install(app, state)

    @app.post("/pull")
    async def pull(request: Request) -> JSONResponse:
        req = parse_body(await request.body(), PullRequest)
        try:
            await run_in_threadpool(pulls.start, req)
        except PullRefused as e:
            kind = "permission_error" if e.status == 403 else "invalid_request_error"
            raise APIError(e.status, str(e), kind, param=e.param) from None
        return JSONResponse({"status": "accepted"})

    @app.get("/pull/{model}")
    async def pull_state(model: str) -> JSONResponse:
        found = pulls.get(model)
        if found is None:
            raise APIError(404, f"no pull of {model[:200]!r} since this node started", "not_found_error")
        return JSONResponse(found.view())

    return app
