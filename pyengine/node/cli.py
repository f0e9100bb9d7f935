"""`llm-router-node`: load one model and serve it over the OpenAI API (also `pyengine serve`).

Flags win over the LLM_NODE_* environment. The model loads while the server already answers
(/health says 503 until it is ready); a model that cannot load ends the process with one
`[ERROR] ...` line and exit code 1. Ctrl-C / SIGTERM end running streams with an error chunk and
stop the server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from pyengine.commands._device import cache_arguments, cache_options, gpu_arguments
from pyengine.errors import ModelLoadError
from pyengine.log import configure
from pyengine.node.app import create_app
from pyengine.node.backend import Backend
from pyengine.node.config import NodeConfig
from pyengine.node.router_client import run_router_client

log = logging.getLogger("pyengine")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True,
                   help="a GGUF path, or a model name in the models folder (e.g. gpt-oss-20b)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, env LLM_NODE_BIND_ADDRESS)")
    p.add_argument("--port", type=int, default=None, help="port (default 8081, env LLM_NODE_PORT)")
    p.add_argument("--models-dir", default=None,
                   help="models folder (default ~/.llm-router/models, env LLM_NODE_MODELS_DIR)")
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help="context length of each slot (default: the model's training context)")
    p.add_argument("--parallel", "-np", type=int, default=None, help="sequences served at once (default 1)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-queue", type=int, default=None, help="requests allowed to wait (default 64)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--router-url", default=None,
                   help="host router to register with and send heartbeats to (env LLM_ROUTER_URL)")
    p.add_argument("--verbose", "-v", action="store_true", help="log per-request timing lines")
    gpu_arguments(p)
    cache_arguments(p)


def load_engine_backend(config: NodeConfig) -> Backend:
    """The real model behind the node (see docs/node.md for its status)."""
    try:
        from pyengine.node.engine_backend import EngineBackend
    except ImportError as e:
        raise ModelLoadError(f"this build has no inference engine to serve with ({e})") from None
    return EngineBackend.load(config)


class NodeServer(uvicorn.Server):
    """uvicorn, told to end in-flight generations before it waits for their connections."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.shutdown(wait=False)
        super().handle_exit(sig, frame)

    def fail(self, message: str) -> None:
        self.exit_code = 1
        self.should_exit = True


def serve(config: NodeConfig, load_backend: Callable[[], Backend]) -> int:
    """Serve until Ctrl-C (exit code 130) / SIGTERM (ends by that signal, as uvicorn does) or a
    failed model load (exit code 1)."""
    app = create_app(config, load_backend, run_router_client)
    state = app.state.node
    server = NodeServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                       timeout_graceful_shutdown=15), state)
    state.on_load_error = server.fail
    log.info("Listening on http://%s:%d", config.host, config.port)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has stopped cleanly
        return 130
    return server.exit_code


def run(args: argparse.Namespace) -> int:
    config = NodeConfig.from_env(model=args.model, host=args.host, port=args.port,
                                 models_dir=args.models_dir, ctx_size=args.ctx_size,
                                 parallel=args.parallel, threads=args.threads, max_queue=args.max_queue,
                                 api_key=args.api_key, verbose=args.verbose, router_url=args.router_url,
                                 device=args.device, n_gpu_layers=args.n_gpu_layers, cpu_moe=args.cpu_moe,
                                 **cache_options(args))
    if config.parallel < 1 or (config.ctx_size is not None and config.ctx_size < 16):
        raise ModelLoadError("--parallel must be at least 1 and --ctx-size at least 16")
    return serve(config, lambda: load_engine_backend(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-router-node", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        return run(args)
    except ModelLoadError as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
