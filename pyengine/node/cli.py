"""`llm-router-node`: load one model and serve it over the OpenAI API (also `pyengine serve`).

Flags win over the LLM_NODE_* environment. The model loads while the server already answers
(/health says 503 until it is ready); the port is bound first, so a busy one is one `[ERROR] port N
is in use` line and exit code 1 with nothing loaded, as is a model that cannot load. Ctrl-C / SIGTERM
end running streams with an error chunk and stop the server; Ctrl-C works (exit code 130) even when
the process was started with SIGINT ignored, as a background job is."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from pyengine.commands._args import Parser, integer, real
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
    p.add_argument("--port", type=integer(1, 65535), default=None, help="port (default 8081, env LLM_NODE_PORT)")
    p.add_argument("--models-dir", default=None,
                   help="models folder (default ~/.llm-router/models, env LLM_NODE_MODELS_DIR)")
    p.add_argument("--ctx-size", "-c", type=integer(16), default=None,
                   help="total context, split evenly across the --parallel slots as in llama-server "
                        "(-c 8192 -np 4: 2048 tokens per slot; default: what memory allows, up to the "
                        "model's training context per slot)")
    p.add_argument("--batch-size", "-b", type=integer(1), default=None, metavar="N",
                   help="prompt tokens one slot evaluates per step (default 512). Smaller keeps the other "
                        "slots' tokens coming while a long prompt is read; larger reads prompts faster")
    p.add_argument("--parallel", "-np", type=integer(1), default=None, help="sequences served at once (default 1)")
    p.add_argument("--alias", "-a", action="append", default=None, metavar="NAME",
                   help="a model id to serve under (repeatable; the first is the id /v1/models shows first)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN", dest="cors_origin",
                   help="a browser origin allowed to call the API (repeatable, e.g. http://localhost:5173; "
                        "'*' for any; default: none). The API key is still required")
    p.add_argument("--chat-template-file", default=None, metavar="FILE",
                   help="render chats with this jinja template (sandboxed) instead of the built-in Harmony renderer")
    p.add_argument("--jinja", action="store_true",
                   help="accepted for llama-server compatibility (templates always run through jinja here)")
    p.add_argument("--threads", "-t", type=integer(1), default=None,
                   help="CPU threads (default: the physical cores this process may use)")
    p.add_argument("--max-queue", type=integer(0), default=None, help="requests allowed to wait (default 64)")
    p.add_argument("--cache-ram", "-cram", type=integer(0), default=None, metavar="MIB",
                   help="host memory in MiB for slot contents a new request would overwrite, written back when a "
                        "later prompt continues them (default 8192, at most a quarter of the memory available beyond the model; "
                        "0: off; CPU caches only)")
    p.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder for slot files: POST /slots/{id}?action=save|restore writes and reads a slot's KV "
                        "cache there (created if missing; default: off, as in llama-server)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health and the web page "
                                                   "(visible in ps: prefer env LLM_NODE_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE (first line)")
    p.add_argument("--pull-source", action="append", default=None, metavar="DIR",
                   help="a folder /pull may copy model files from (repeatable; default: none, path pulls refused)")
    p.add_argument("--max-body-mb", type=real(0.001), default=None,
                   help="largest request body in MiB; bigger ones get 413 (default 8)")
    p.add_argument("--router-url", default=None,
                   help="host router to register with and send heartbeats to (env LLM_ROUTER_URL)")
    p.add_argument("--no-webui", action="store_true", help="do not serve the web page at / (see docs/webui.md)")
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


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads (ModelLoadError when it cannot be)."""
    if not 0 <= port <= 65535:
        raise ModelLoadError(f"port {port} is not a port number (0-65535)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except OSError as e:
        raise ModelLoadError(f"cannot listen on {host}: {e.strerror or e}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ModelLoadError(f"port {port} is in use") from None
        raise ModelLoadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(config: NodeConfig, load_backend: Callable[[], Backend]) -> int:
    """Serve until Ctrl-C (exit code 130) / SIGTERM (ends by that signal, as uvicorn does) or a
    failed model load (exit code 1)."""
    sock = bind(config.host, config.port)
    if threading.current_thread() is threading.main_thread():
        # A background job inherits SIGINT ignored; uvicorn re-raises the signal it caught only
        # through the handler it found, so without one Ctrl-C would end the server with exit code 0.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app = create_app(config, load_backend, run_router_client)
    state = app.state.node
    server = NodeServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                       timeout_graceful_shutdown=15), state)
    state.on_load_error = server.fail
    log.info("Listening on http://%s:%d", config.host, config.port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has stopped cleanly
        return 130
    return server.exit_code


def _api_key_file(path: str | None) -> str | None:
    """The key on the first line of `path`; ModelLoadError when it cannot be read or is empty."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read --api-key-file {path}: {e}") from None
    if not key:
        raise ModelLoadError(f"--api-key-file {path} holds no key on its first line")
    return key


def run(args: argparse.Namespace) -> int:
    if args.max_body_mb is not None and args.max_body_mb <= 0:
        raise ModelLoadError("--max-body-mb must be positive")
    config = NodeConfig.from_env(model=args.model, host=args.host, port=args.port,
                                 models_dir=args.models_dir, ctx_size=args.ctx_size, n_batch=args.batch_size,
                                 parallel=args.parallel, threads=args.threads, max_queue=args.max_queue,
                                 cache_ram_mib=args.cache_ram, slot_save_path=args.slot_save_path,
                                 api_key=args.api_key or _api_key_file(args.api_key_file), verbose=args.verbose,
                                 router_url=args.router_url,
                                 pull_sources=tuple(args.pull_source or ()) or None,
                                 max_body_bytes=int(args.max_body_mb * 2**20) if args.max_body_mb else None,
                                 device=args.device, n_gpu_layers=args.n_gpu_layers, cpu_moe=args.cpu_moe,
                                 aliases=args.alias, cors_origins=args.cors_origin,
                                 chat_template_file=args.chat_template_file, jinja=args.jinja,
                                 **cache_options(args))
    config.webui = not args.no_webui
    config.repack = not args.no_repack
    if config.parallel < 1 or (config.ctx_size is not None and config.ctx_size < 16 * config.parallel):
        raise ModelLoadError("--parallel must be at least 1 and --ctx-size at least 16 per slot "
                             "(--ctx-size is the total of all --parallel slots)")
    if any(not a.strip() for a in config.aliases):
        raise ModelLoadError("--alias must not be empty")
    if config.slot_save_path is not None:
        try:
            config.slot_save_path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelLoadError(f"--slot-save-path {config.slot_save_path}: {e.strerror or e}") from None
    return serve(config, lambda: load_engine_backend(config))


def main(argv: list[str] | None = None) -> int:
    try:
        parser = Parser(prog="llm-router-node", description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
        configure(args.verbose)
        return run(args)
    except ModelLoadError as e:
        print(f"[ERROR] {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
