"""The node's settings: command-line flags first, then the router world's LLM_NODE_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODELS_DIR = Path("~/.llm-router/models")


@dataclass
class NodeConfig:
    """Everything the app, scheduler and router client need to know about this node."""

    model: str = ""
    models_dir: Path = DEFAULT_MODELS_DIR
    host: str = "127.0.0.1"
    port: int = 8081
    ctx_size: int | None = None
    parallel: int = 1
    threads: int | None = None
    api_key: str | None = None
    verbose: bool = False
    max_queue: int = 64
    router_url: str | None = None
    heartbeat_secs: float = 10.0
    advertise_ip: str | None = None
    device: str = "cpu"
    n_gpu_layers: int | None = None
    cpu_moe: bool = False
    cache_type_k: str = "f16"  # KV cache element types (-ctk/-ctv), as llama-server's /props reports them
    cache_type_v: str = "f16"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **flags: object) -> NodeConfig:
        """Defaults, overridden by LLM_NODE_* / LLM_ROUTER_URL, overridden by non-None `flags`."""
        env = dict(os.environ if env is None else env)
        cfg = cls()
        if env.get("LLM_NODE_PORT"):
            cfg.port = int(env["LLM_NODE_PORT"])
        if env.get("LLM_NODE_BIND_ADDRESS"):
            cfg.host = env["LLM_NODE_BIND_ADDRESS"]
        if env.get("LLM_NODE_MODELS_DIR"):
            cfg.models_dir = Path(env["LLM_NODE_MODELS_DIR"])
        if env.get("LLM_NODE_HEARTBEAT_SECS"):
            cfg.heartbeat_secs = float(env["LLM_NODE_HEARTBEAT_SECS"])
        if env.get("LLM_NODE_LOG_LEVEL", "").lower() in ("debug", "trace"):
            cfg.verbose = True
        cfg.router_url = env.get("LLM_ROUTER_URL") or None
        cfg.advertise_ip = env.get("LLM_NODE_IP") or None
        if env.get("LLM_NODE_DEVICE"):
            cfg.device = env["LLM_NODE_DEVICE"]
        for key, value in flags.items():
            if value is not None and value is not False:
                setattr(cfg, key, Path(value) if key == "models_dir" else value)
        cfg.models_dir = Path(cfg.models_dir).expanduser()
        return cfg
