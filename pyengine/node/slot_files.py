"""llama-server's slot files: POST /slots/{id}?action=save|restore|erase, on with --slot-save-path.

A slot's KV cache (the conversation it holds) is written to a file in the --slot-save-path folder
and read back later, into the same or another slot, by this process or a later one (a restart, a
long system prompt evaluated once for good). The file is an EngineState file
(pyengine/engine_state.py), the one `Engine.save_state().save(path)` writes, so the library and the
node read each other's. Request and answer shapes are llama-server's. File names are plain names
inside the folder (no separators, no leading dot, no "..", no control characters), so a request
never reads or writes anywhere else. The copy into and out of the slot runs on the scheduler's
worker between steps, once no request holds the slot; the file's reading and writing do not hold
the worker up."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pyengine.engine_state import EngineState, StateFileError
from pyengine.model_paths import is_plain_name
from pyengine.node.scheduler import Scheduler, ShuttingDown
from pyengine.node.schemas import APIError, SlotFileRequest, bad_request, parse_body

if TYPE_CHECKING:
    from pyengine.node.app import NodeState

RESERVED = set('/\\:*?"<>|')


def valid_filename(name: str) -> bool:
    """Whether `name` is a plain file name for the slot folder (pyengine/model_paths.py
    is_plain_name, which also keeps hidden names out: a save's temporary file is one) with
    llama-server's further rules: no surrounding spaces, no trailing dot, no reserved character."""
    return (is_plain_name(name) and name == name.strip() and not name.endswith(".")
            and not RESERVED & set(name))


def not_supported(message: str) -> APIError:
    return APIError(501, message, "not_supported_error")


async def _done(future: Any) -> Any:
    """The outcome of a scheduler slot task; 503 when the node stops first, 501 where the backend
    cannot read or write its caches."""
    try:
        return await asyncio.wrap_future(future)
    except ShuttingDown as e:
        raise APIError(503, str(e), "unavailable_error") from None
    except NotImplementedError as e:
        raise not_supported(str(e)) from None


async def save(scheduler: Scheduler, index: int, folder: Path, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    state = await _done(scheduler.save_slot(index))
    try:
        written = await run_in_threadpool(state.save, folder / name)
    except OSError as e:
        raise APIError(500, f"could not write {name}: {e.strerror or e}", "server_error") from None
    return {"id_slot": index, "filename": name, "n_saved": len(state.tokens), "n_written": written,
            "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}


async def restore(scheduler: Scheduler, index: int, folder: Path, name: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = folder / name
    try:
        size = path.stat().st_size
        state = await run_in_threadpool(EngineState.load, path)
    except FileNotFoundError:
        raise bad_request(f"there is no slot file {name}", "filename") from None
    except StateFileError as e:
        raise bad_request(f"{name}: {e.reason}", "filename") from None
    except OSError as e:
        raise bad_request(f"cannot read {name}: {e.strerror or e}", "filename") from None
    try:
        n = await _done(scheduler.restore_slot(index, state))
    except ValueError as e:  # another model or cache type, or more than the slot holds
        raise bad_request(f"{name}: {e}", "filename") from None
    return {"id_slot": index, "filename": name, "n_restored": n, "n_read": size,
            "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}


def install(app: FastAPI, state: NodeState) -> None:
    """Register POST /slots/{id_slot} on `app`."""

    @app.post("/slots/{id_slot}")
    async def slot_action(id_slot: str, request: Request, action: str = "") -> JSONResponse:
        folder = state.config.slot_save_path
        if folder is None:
            raise not_supported("This server does not support slots action. Start it with `--slot-save-path`")
        _, scheduler = state.ready()
        if not re.fullmatch(r"[0-9]{1,9}", id_slot) or int(id_slot) >= scheduler.n_parallel:
            raise bad_request("Invalid slot ID", "id_slot")
        index = int(id_slot)
        raw = await request.body()
        req = parse_body(raw, SlotFileRequest) if raw.strip() else SlotFileRequest()
        if action == "erase":
            return JSONResponse({"id_slot": index, "n_erased": await _done(scheduler.erase_slot(index))})
        if action not in ("save", "restore"):
            raise bad_request("Invalid action", "action")
        if req.filename is None or not valid_filename(req.filename):
            raise bad_request("Invalid filename", "filename")
        run = save if action == "save" else restore
        return JSONResponse(await run(scheduler, index, Path(folder), req.filename))
