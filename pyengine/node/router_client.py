"""Registration with the host router and the heartbeat that keeps this node online there.

Contract (docs router-node.md): start serving first (the router probes GET /v1/models on
runtime_port + 1 while registering), then POST {router}/api/nodes; every LLM_NODE_HEARTBEAT_SECS
POST {router}/api/health with the agent token. A failed registration is retried with back-off and
never stops the node; a 403 (router wants a GPU) is logged and the node keeps serving alone."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from typing import Any
from urllib.parse import urlparse

import httpx

from pyengine import __version__
from pyengine.node.config import NodeConfig

log = logging.getLogger("pyengine")
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)


def local_ip_toward(url: str) -> str:
    """The address of the interface this machine would use to reach `url` (no packet is sent)."""
    host = urlparse(url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class HostLoad:
    """CPU and memory use in percent, read from /proc (Linux); 0 where unavailable."""

    def __init__(self) -> None:
        self.last = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    def cpu_usage(self) -> float:
        now, before = self._cpu_times(), self.last
        self.last = now
        if not now or not before or now[0] == before[0]:
            return 0.0
        busy = (now[0] - before[0]) - (now[1] - before[1])
        return round(100.0 * busy / (now[0] - before[0]), 1)

    @staticmethod
    def memory_usage() -> float:
        try:
            with open("/proc/meminfo") as f:
                info = {line.split(":")[0]: int(line.split()[1]) for line in f}
            return round(100.0 * (1 - info["MemAvailable"] / info["MemTotal"]), 1)
        except (OSError, KeyError, ValueError, ZeroDivisionError):
            return 0.0


class GpuProbe:
    """The machine's NVIDIA GPUs as nvidia-smi reports them; none where it is missing or fails.

    These are hardware facts for the router's bookkeeping: this version of the engine computes on
    the CPU even where a GPU is present (docs/node.md)."""

    COMMAND = "nvidia-smi"
    QUERY = "--query-gpu=name,memory.total,memory.used,utilization.gpu,compute_cap"

    def __init__(self) -> None:
        self.warned = False

    def read(self) -> list[dict[str, Any]]:
        """One dict per GPU: name, memory_total_mb, memory_used_mb, utilization (%), compute_cap."""
        exe = shutil.which(self.COMMAND)
        if not exe:
            return []
        try:
            out = subprocess.run([exe, self.QUERY, "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
            gpus = []
            for line in out.strip().splitlines():
                name, total, used, util, cap = (f.strip() for f in line.split(","))
                gpus.append({"name": name, "memory_total_mb": float(total), "memory_used_mb": float(used),
                             "utilization": float(util), "compute_cap": cap})
            return gpus
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            if not self.warned:  # once, not at every heartbeat
                log.warning("could not read the GPUs with nvidia-smi (reporting none): %s", e)
                self.warned = True
            return []

    @staticmethod
    def devices(gpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Registration's gpu_devices: one entry per model with its count and memory in bytes."""
        out: dict[str, dict[str, Any]] = {}
        for g in gpus:
            entry = out.setdefault(g["name"], {"model": g["name"], "count": 0,
                                               "memory": int(g["memory_total_mb"] * 1024 * 1024)})
            entry["count"] += 1
        return list(out.values())

    @staticmethod
    def heartbeat_fields(gpus: list[dict[str, Any]]) -> dict[str, Any]:
        """The heartbeat's optional gpu_* figures over all GPUs (none without a GPU)."""
        if not gpus:
            return {}
        total = sum(g["memory_total_mb"] for g in gpus)
        used = sum(g["memory_used_mb"] for g in gpus)
        return {"gpu_usage": round(sum(g["utilization"] for g in gpus) / len(gpus), 1),
                "gpu_memory_usage": round(100.0 * used / total, 1) if total else 0.0,
                "gpu_memory_total_mb": int(total), "gpu_memory_used_mb": int(used),
                "gpu_model_name": gpus[0]["name"], "gpu_compute_capability": gpus[0]["compute_cap"]}


class RouterClient:
    """Registers `state`'s node with the router at `config.router_url` and sends heartbeats;
    `status` and the last heartbeat's time and outcome are what the web page shows."""

    def __init__(self, state: Any, config: NodeConfig) -> None:
        self.state = state
        self.config = config
        self.base = config.router_url.rstrip("/")
        self.node_id: str | None = None
        self.token: str | None = None
        self.load = HostLoad()
        self.gpus = GpuProbe()
        self.status = "starting"  # registering, registered, refused (403) or failed (retries spent)
        self.last_heartbeat: float | None = None  # Unix time of the last heartbeat sent
        self.last_heartbeat_result: str | None = None  # "HTTP 200" or the connection error

    def view(self) -> dict[str, Any]:
        """Where this node stands with the router, as JSON."""
        return {"url": self.base, "status": self.status, "node_id": self.node_id,
                "heartbeat_secs": self.config.heartbeat_secs, "last_heartbeat": self.last_heartbeat,
                "last_heartbeat_result": self.last_heartbeat_result}

    def registration(self) -> dict[str, Any]:
        devices = GpuProbe.devices(self.gpus.read())
        body = {"machine_name": socket.gethostname(),
                "ip_address": self.config.advertise_ip or local_ip_toward(self.base),
                "runtime_version": __version__, "runtime_port": self.config.port - 1,
                "gpu_available": bool(devices), "gpu_devices": devices}
        if devices:
            body.update(gpu_count=sum(d["count"] for d in devices), gpu_model=devices[0]["model"])
        return body

    def heartbeat(self) -> dict[str, Any]:
        s = self.state
        ready = s.backend is not None
        return {"node_id": self.node_id, "cpu_usage": self.load.cpu_usage(),
                "memory_usage": self.load.memory_usage(), "active_requests": s.active_requests(),
                "average_response_time_ms": round(s.average_response_ms(), 1),
                "loaded_models": [s.model_name()] if ready else [],
                "initializing": not ready and not s.load_error, "ready_models": [int(ready), 1],
                **GpuProbe.heartbeat_fields(self.gpus.read())}

    async def register(self, client: httpx.AsyncClient) -> bool:
        self.status = "registering"
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            await asyncio.sleep(delay)
            body = await asyncio.to_thread(self.registration)  # nvidia-smi may take a moment
            try:
                r = await client.post(f"{self.base}/api/nodes", json=body)
            except httpx.HTTPError as e:
                log.warning("router registration attempt %d failed: %s", attempt + 1, e)
                continue
            if r.status_code == 403:
                log.error("the router at %s refused this node (403: it requires a GPU); "
                          "serving standalone", self.base)
                self.status = "refused"
                return False
            reply = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code in (200, 201) and reply.get("node_id") and reply.get("agent_token"):
                self.node_id, self.token = str(reply["node_id"]), str(reply["agent_token"])
                log.info("Registered with router %s as node %s", self.base, self.node_id)
                self.status = "registered"
                return True
            log.warning("router registration attempt %d failed: HTTP %d %s", attempt + 1,
                        r.status_code, r.text[:200])
        log.error("could not register with the router at %s; serving standalone", self.base)
        self.status = "failed"
        return False

    async def wait_until_serving(self, timeout: float = 60.0) -> None:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "", "::") else self.config.host
        for _ in range(int(timeout / 0.1)):
            try:
                _, writer = await asyncio.open_connection(host, self.config.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)

    async def run(self) -> None:
        await self.wait_until_serving()
        async with httpx.AsyncClient(timeout=10.0) as client:
            if not await self.register(client):
                return
            while True:
                await asyncio.sleep(self.config.heartbeat_secs)
                beat = await asyncio.to_thread(self.heartbeat)
                self.last_heartbeat = time.time()
                try:
                    r = await client.post(f"{self.base}/api/health", json=beat,
                                          headers={"X-Agent-Token": self.token})
                except httpx.HTTPError as e:
                    log.warning("heartbeat to the router failed: %s", e)
                    self.last_heartbeat_result = str(e) or type(e).__name__
                    continue
                self.last_heartbeat_result = f"HTTP {r.status_code}"
                if r.status_code in (401, 404):
                    log.warning("the router no longer knows this node (HTTP %d); registering again",
                                r.status_code)
                    if not await self.register(client):
                        return
                elif r.status_code >= 400:
                    log.warning("heartbeat rejected: HTTP %d %s", r.status_code, r.text[:200])


async def run_router_client(state: Any) -> None:
    """Lifespan task for create_app(start_router=...); does nothing without LLM_ROUTER_URL."""
    if state.config.router_url:
        state.router = RouterClient(state, state.config)
        await state.router.run()


