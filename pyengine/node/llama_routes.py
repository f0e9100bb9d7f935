"""llama-server's informational routes, in the shapes a web UI reads: /props, /slots,
/apply-template, and OpenAI's GET /v1/models/{id}.

They live apart from app.py's generation routes because they only describe the node (the model,
its slots, how a chat would be rendered) and never generate. Like every route but /health they
need the API key when one is set (RequestIdAndAuth in app.py checks it before they run)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pyengine import __version__
from pyengine.node.schemas import APIError, ApplyTemplateRequest, parse_body

if TYPE_CHECKING:
    from pyengine.node.app import NodeState


def build_info(device: str) -> dict[str, Any]:
    """The package version and what the C core computes with here."""
    try:
        from pyengine._cpu import simd_level

        simd = simd_level()
    except ImportError:  # a build without the compiled core
        simd = "unknown"
    return {"version": __version__, "cpu_features": simd, "device": device}


def props(state: NodeState) -> dict[str, Any]:
    """GET /props: the model, the context (total and per slot), the slots, the template, the build."""
    backend, scheduler = state.ready()
    info = backend.info
    n_slots = scheduler.n_parallel
    return {
        "model_path": backend.path or state.config.model, "model_alias": state.model_name(), "aliases": state.model_ids(),
        "n_ctx": info.n_ctx * n_slots, "n_ctx_slot": info.n_ctx, "total_slots": n_slots,
        "chat_template": backend.chat_template_text(), "build_info": build_info(backend.device),
        "device": backend.device, "n_threads": backend.n_threads,
        "cache_type_k": state.config.cache_type_k, "cache_type_v": state.config.cache_type_v,
        "model": backend.describe(), "webui": state.config.webui,
    }


def install(app: FastAPI, state: NodeState, render_chat: Callable[..., Awaitable[tuple[list[int], Any]]]) -> None:
    """Register the routes on `app`; `render_chat` turns a chat body into prompt ids as the chat route does."""

    @app.get("/props")
    async def get_props() -> JSONResponse:
        return JSONResponse(props(state))

    @app.get("/slots")
    async def get_slots() -> JSONResponse:
        _, scheduler = state.ready()
        return JSONResponse(scheduler.slot_states())

    @app.post("/apply-template")
    async def apply_template(request: Request) -> JSONResponse:
        """The prompt text a chat body renders to (llama-server's route), without generating."""
        req = parse_body(await request.body(), ApplyTemplateRequest)
        backend, _ = state.ready()
        ids, _ = await render_chat(backend, req)
        return JSONResponse({"prompt": await run_in_threadpool(backend.detokenize, ids)})

    @app.get("/v1/models/{model_id:path}")
    @app.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        if not state.answers_to(model_id) or not model_id:
            raise APIError(404, f"The model `{model_id}` does not exist; this node serves "
                           f"`{state.model_name()}`", "invalid_request_error", "model_not_found", "model")
        ids = {m.lower(): m for m in state.model_ids()}
        return JSONResponse(state.model_entry(ids.get(model_id.strip().lower(), state.model_name())))
