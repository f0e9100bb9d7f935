"""The node's settings: command-line flags first, then the router world's LLM_NODE_* variables.

The API key can come from `LLM_NODE_API_KEY` or a file (`--api-key-file`) as well as `--api-key`,
so that it need not be visible in `ps`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pyengine.runner import DEFAULT_CHECKPOINT_MIN_STEP, DEFAULT_CHECKPOINTS

DEFAULT_MODELS_DIR = Path("~/.llm-router/models")
# A full 131,072-token context as JSON token ids is under 1 MiB, as text a few MiB at most.
DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class NodeConfig:
    """Everything the app, scheduler and router client need to know about this node."""

    model: str = ""
    models_dir: Path = DEFAULT_MODELS_DIR
    host: str = "127.0.0.1"
    port: int = 8081
    ctx_size: int | None = None
    n_batch: int | None = None  # prompt tokens a slot evaluates per step (-b); None: the engine's default
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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    pull_sources: tuple[Path, ...] = ()  # folders /pull {"path"} may copy from; none: path pulls are off
    aliases: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    chat_template_file: str | None = None
    jinja: bool = False
    webui: bool = True  # GET / serves the web page (off with --no-webui)
    cache_type_k: str = "f16"  # KV cache element types (-ctk/-ctv), as llama-server's /props reports them
    cache_type_v: str = "f16"
    repack: bool = True  # MXFP4 experts from the repack cache file (off with --no-repack)
    use_mmap: bool = True  # weights read where the files are mapped (off with --no-mmap: copied at load)
    cache_ram_mib: int | None = None  # prompt cache in host memory (--cache-ram); None: prompt_cache_bytes() decides
    slot_save_path: Path | None = None  # the folder of POST /slots/{id} files (--slot-save-path); None: off
    ctx_checkpoints: int = DEFAULT_CHECKPOINTS  # sliding-ring checkpoints a slot keeps (--ctx-checkpoints)
    checkpoint_min_step: int = DEFAULT_CHECKPOINT_MIN_STEP  # tokens between checkpoints inside a prompt

    def prompt_cache_bytes(self, available: int | None, model_bytes: int) -> int:
        """Bytes the prompt cache may hold: --cache-ram MiB, else llama-server's default of 8 GiB,
        capped at a quarter of the memory available at start (`available`, MemAvailable) beyond
        the model file's size, so that the cache never crowds the model's own pages out of memory."""
        if self.cache_ram_mib is not None:
            return self.cache_ram_mib << 20
        if available is None:
            return 8192 << 20
        return max(0, min(8192 << 20, (available - model_bytes) // 4))

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
        cfg.api_key = env.get("LLM_NODE_API_KEY") or None
        for key, value in flags.items():
            if value is not None and value is not False and value != []:
                setattr(cfg, key, Path(value) if key == "models_dir" else value)
        cfg.models_dir = Path(cfg.models_dir).expanduser()
        cfg.slot_save_path = Path(cfg.slot_save_path).expanduser() if cfg.slot_save_path else None
        cfg.pull_sources = tuple(Path(p).expanduser() for p in cfg.pull_sources)
        return cfg
