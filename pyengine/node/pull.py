"""POST /pull: fetch a model into the models folder in the background, reporting progress.

The router asks for a model by id and gives a `path` on shared storage (copied) or a
`download_url` (streamed over HTTP). The file lands where the router's storage convention puts
it, `<models_dir>/<id with ':' -> '_', '_latest' when untagged>/model.gguf`, written to a
`.part` file first so a half-copied model is never picked up."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from pyengine.model_paths import router_dir_name
from pyengine.node.config import NodeConfig
from pyengine.node.schemas import PullRequest

log = logging.getLogger("pyengine")
CHUNK = 8 << 20


def target_path(models_dir: Path, model: str) -> Path:
    """Where the router's storage convention puts `model`; ValueError for an id that is not one
    folder name (a `/`, a `\\` or a leading dot could escape the models folder)."""
    if not model or model.startswith(".") or "/" in model or "\\" in model or "\0" in model:
        raise ValueError(f"invalid model id {model!r}")
    return Path(models_dir) / router_dir_name(model) / "model.gguf"


def _copy(src: Path, dst: Path, report: Callable[[float], None]) -> None:
    total = src.stat().st_size or 1
    done = 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
            done += len(block)
            report(done / total)


def _download(url: str, dst: Path, report: Callable[[float], None]) -> None:
    with httpx.stream("GET", url, follow_redirects=True, timeout=60.0) as r, dst.open("wb") as fout:
        r.raise_for_status()
        total = int(r.headers.get("content-length", 0)) or None
        done = 0
        for block in r.iter_bytes(CHUNK):
            fout.write(block)
            done += len(block)
            if total:
                report(done / total)


def run_pull(req: PullRequest, config: NodeConfig) -> Path | None:
    """Copy or download the model; returns the final path, or None after logging the failure."""
    dst = target_path(config.models_dir, req.model)

    def report(progress: float) -> None:
        if config.router_url and req.task_id:
            try:
                httpx.post(f"{config.router_url.rstrip('/')}/api/tasks/{req.task_id}/progress",
                           json={"progress": round(min(progress, 1.0), 4)}, timeout=5.0)
            except httpx.HTTPError as e:
                log.warning("could not report pull progress to the router: %s", e)

    part = dst.with_suffix(".gguf.part")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if req.path:
            _copy(Path(req.path).expanduser(), part, report)
        else:
            _download(req.download_url, part, report)
        shutil.move(part, dst)
    except (OSError, httpx.HTTPError) as e:
        log.error("pull of %s failed: %s", req.model, e)
        part.unlink(missing_ok=True)
        return None
    report(1.0)
    log.info("Pulled model %s to %s", req.model, dst)
    return dst


def start_pull(req: PullRequest, config: NodeConfig) -> threading.Thread:
    """Check the id (ValueError), then copy or download on a background thread."""
    target_path(config.models_dir, req.model)
    t = threading.Thread(target=run_pull, args=(req, config), name="pyengine-pull", daemon=True)
    t.start()
    return t
