"""Run a node app under uvicorn on a free 127.0.0.1 port in a background thread (test helper)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvicorn

from pyengine.node.app import create_app
from pyengine.node.backend import Backend
from pyengine.node.config import NodeConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    """Until the node process at url answers /health with 200; fails with its output if it exits
    first, or when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the node never became ready"
        time.sleep(0.05)


@contextlib.contextmanager
def serve_app(app: Any, port: int) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@contextlib.contextmanager
def run_node(backend: Backend | Callable[[], Backend], wait_ready: bool = True, start_router: Any = None, **cfg: Any) -> Iterator[tuple[str, Any]]:
    """Serve `backend` (or what a loader callable returns) as a node; yields (URL, NodeState)."""
    port = free_port()
    config = NodeConfig(model="scripted-oss", port=port, **cfg)
    load = (lambda: backend) if isinstance(backend, Backend) else backend
    app = create_app(config, load, start_router)
    with serve_app(app, port) as url:
        if wait_ready:
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/health").status_code != 200:
                assert time.monotonic() < deadline, "node never became ready"
                time.sleep(0.02)
        yield url, app.state.node
