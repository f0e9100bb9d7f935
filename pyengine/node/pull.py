"""POST /pull: fetch a model into the models folder in the background, reporting progress.

The router asks for a model by id and gives a `path` on shared storage (copied) or a
`download_url` (streamed over HTTP). The file lands where the router's storage convention puts
it, `<models_dir>/<id with ':' -> '_', '_latest' when untagged>/model.gguf`.

Everything a pull writes is made safe against a hostile client and against other pulls:
- the request is checked before it is accepted (id, URL, source folder), so a pull that cannot work
  is a 400, not a background failure;
- one pull per id at a time (a second gets 409); its state is kept for `GET /pull/{id}`;
- it writes its own temporary file, created with O_EXCL | O_NOFOLLOW inside the model's folder
  opened with O_NOFOLLOW (a planted symlink is refused, never followed), fsyncs it, checks the
  size and sha256 digest the router gave, and renames it over `model.gguf` atomically;
- `path` pulls read only regular files inside the configured source folders (`--pull-source`,
  none by default), so /pull cannot copy e.g. /proc/self/environ into the models folder;
- leftover temporary files (a killed node) and the folders they leave empty are removed at start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pyengine.model_paths import MAX_NAME_BYTES, is_plain_name, router_dir_name
from pyengine.node.config import NodeConfig
from pyengine.node.schemas import PullRequest

log = logging.getLogger("pyengine")
CHUNK = 8 << 20
FINAL = "model.gguf"
PART_RE = re.compile(r"model\.gguf\.[0-9a-f]*\.?part")  # ours, and the old fixed `model.gguf.part`


class PullRefused(ValueError):
    """The request cannot be pulled; `param` names the field at fault, `status` the HTTP status."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def target_path(models_dir: Path, model: str) -> Path:
    """Where the router's storage convention puts `model`; ValueError for an id that is not one
    folder name (a `/`, a `\\` or a leading dot could escape the models folder)."""
    if not model or model.startswith(".") or not is_plain_name(router_dir_name(model)):
        raise ValueError(f"invalid model id {model[:80]!r}: one printable folder name of at most "
                         f"{MAX_NAME_BYTES - len('_latest')} bytes, not starting with a dot")
    return Path(models_dir) / router_dir_name(model) / FINAL


def _source(path: str, sources: tuple[Path, ...]) -> Path:
    """The real path of a `path` pull's file, which must lie inside a configured source folder."""
    if not sources:
        raise PullRefused("this node copies no local files (start it with --pull-source DIR to allow "
                          "pulls from that folder)", "path", 403)
    try:
        real = Path(path).expanduser().resolve(strict=True)
        regular = real.is_file()
    except (OSError, ValueError, RuntimeError):  # missing, too long, a NUL byte, an unknown ~user
        regular = False
    if not regular:
        raise PullRefused(f"path {path!r} is not a readable file on this node", "path")
    if not any(real.is_relative_to(s) for s in sources):
        raise PullRefused(f"path {path!r} is outside the folders this node copies from (--pull-source)",
                          "path", 403)
    return real


def _check_url(url: str) -> None:
    try:
        u = httpx.URL(url)
        port = u.port  # httpx leaves an out-of-range port to the connection
    except (httpx.InvalidURL, ValueError):
        raise PullRefused("download_url is not a valid URL", "download_url") from None
    if not u.host or (port is not None and not 0 < port < 65536):
        raise PullRefused("download_url needs a host and a port from 1 to 65535", "download_url")


@dataclass
class Pull:
    """One pull's state as `GET /pull/{id}` shows it."""

    model: str
    status: str = "running"  # running, done, failed
    progress: float = 0.0
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def view(self) -> dict[str, object]:
        out: dict[str, object] = {"model": self.model, "status": self.status, "progress": round(self.progress, 4)}
        if self.error:
            out["error"] = self.error
        return out


class Pulls:
    """The pulls of one node: check, start, and remember them (the last state of every id)."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.sources = tuple(Path(p).resolve() for p in config.pull_sources)
        self.lock = threading.Lock()
        self.by_id: dict[str, Pull] = {}

    def get(self, model: str) -> Pull | None:
        with self.lock:
            return self.by_id.get(model)

    def start(self, req: PullRequest) -> Pull:
        """Check the request (PullRefused) and start it on a background thread."""
        try:
            target_path(self.config.models_dir, req.model)
        except ValueError as e:
            raise PullRefused(str(e), "model") from None
        if not req.path and not req.download_url:
            raise PullRefused("pull needs a path or a download_url", "path")
        source = _source(req.path, self.sources) if req.path else None
        if source is None:
            _check_url(req.download_url)
        with self.lock:
            running = self.by_id.get(req.model)
            if running and running.status == "running":
                raise PullRefused(f"a pull of {req.model} is already running", "model", 409)
            pull = self.by_id[req.model] = Pull(req.model)
        pull.thread = threading.Thread(target=self._run, args=(pull, req, source), name="pyengine-pull",
                                       daemon=True)
        pull.thread.start()
        return pull

    def _run(self, pull: Pull, req: PullRequest, source: Path | None) -> None:
        def report(progress: float) -> None:
            pull.progress = min(progress, 1.0)
            if self.config.router_url and req.task_id:
                try:
                    httpx.post(f"{self.config.router_url.rstrip('/')}/api/tasks/{req.task_id}/progress",
                               json={"progress": round(pull.progress, 4)}, timeout=5.0)
                except httpx.HTTPError as e:
                    log.warning("could not report pull progress to the router: %s", e)

        try:
            dst = run_pull(req, source, self.config.models_dir, report)
        except Exception as e:  # noqa: BLE001 - a background pull must report, never raise
            pull.status, pull.error = "failed", str(e) or type(e).__name__
            log.error("pull of %s failed: %s", req.model, pull.error)
            return
        pull.status = "done"
        report(1.0)
        log.info("Pulled model %s to %s", req.model, dst)


def _open_dir(parent_fd: int, name: str, create: bool) -> tuple[int, bool]:
    """Open folder `name` under `parent_fd` without following a symlink; (fd, created)."""
    created = False
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            created = True
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd), created
    except OSError as e:
        raise OSError(f"{name} in the models folder is not a plain folder (a symlink?): {e.strerror}") from None


def _fill(out: int, chunks: Iterable[bytes], total: int | None, report: Callable[[float], None],
          digest: Any) -> int:
    """Write every chunk to the file descriptor `out`; the number of bytes written."""
    done = 0
    for block in chunks:
        view = memoryview(block)
        while view:
            view = view[os.write(out, view):]
        digest.update(block)
        done += len(block)
        if total:
            report(done / total)
    return done


def run_pull(req: PullRequest, source: Path | None, models_dir: Path, report: Callable[[float], None]) -> Path:
    """Copy or download into a fresh temporary file, check it, and rename it over model.gguf."""
    dst = target_path(models_dir, req.model)
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    root = os.open(models_dir, os.O_RDONLY | os.O_DIRECTORY)
    folder, created = -1, False
    part = f"{FINAL}.{os.urandom(8).hex()}.part"
    out = -1
    try:
        folder, created = _open_dir(root, dst.parent.name, create=True)
        out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
        sha = hashlib.sha256()
        if source is not None:
            with open(source, "rb") as fin:
                if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
                    raise OSError(f"{source} is not a regular file")
                total = os.fstat(fin.fileno()).st_size or None
                done = _fill(out, iter(lambda: fin.read(CHUNK), b""), total, report, sha)
        else:
            with httpx.stream("GET", req.download_url, follow_redirects=True, timeout=60.0) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length", 0) or 0) or None
                done = _fill(out, r.iter_bytes(CHUNK), total, report, sha)
        if req.size is not None and done != req.size:
            raise OSError(f"got {done} bytes, the router said {req.size}")
        if req.digest is not None and sha.hexdigest() != req.digest.removeprefix("sha256:").lower():
            raise OSError(f"sha256 {sha.hexdigest()} differs from the router's digest {req.digest}")
        os.fsync(out)
        os.close(out)
        out = -1
        os.replace(part, FINAL, src_dir_fd=folder, dst_dir_fd=folder)  # a symlink named model.gguf is replaced
        os.fsync(folder)
        return dst
    except BaseException:
        if out >= 0:
            os.close(out)
        if folder >= 0:
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=folder)
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(dst.parent.name, dir_fd=root)
        raise
    finally:
        if folder >= 0:
            os.close(folder)
        os.close(root)


def clean_leftovers(models_dir: Path) -> None:
    """Remove the temporary files of pulls a previous run did not finish, and folders left empty."""
    try:
        folders = [d for d in Path(models_dir).iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return
    for d in folders:
        try:
            parts = [f for f in d.iterdir() if PART_RE.fullmatch(f.name) and not f.is_symlink() and f.is_file()]
            for f in parts:
                f.unlink()
                log.info("removed %s, left by an unfinished pull", f)
            if parts and not any(d.iterdir()):
                d.rmdir()
        except OSError as e:
            log.warning("could not clean up %s: %s", d, e)
