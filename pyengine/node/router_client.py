"""Registration with the host router and the heartbeat that keeps this node online there.

Contract (docs router-node.md): start serving first (the router probes GET /v1/models on
runtime_port + 1 while registering), then POST {router}/api/nodes; every LLM_NODE_HEARTBEAT_SECS
POST {router}/api/health with the agent token. A failed registration is retried with back-off and
never stops the node; a 403 (router wants a GPU) is logged and the node keeps serving alone."""

from __future__ import annotations

import asyncio
import logging
import socket
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


class RouterClient:
    """Registers `state`'s node with the router at `config.router_url` and sends heartbeats."""

    def __init__(self, state: Any, config: NodeConfig) -> None:
        self.state = state
        self.config = config
        self.base = config.router_url.rstrip("/")
        self.node_id: str | None = None
        self.token: str | None = None
        self.load = HostLoad()

    def registration(self) -> dict[str, Any]:
        return {"machine_name": socket.gethostname(),
                "ip_address": self.config.advertise_ip or local_ip_toward(self.base),
                "runtime_version": __version__, "runtime_port": self.config.port - 1,
                "gpu_available": False, "gpu_devices": []}

    def heartbeat(self) -> dict[str, Any]:
        s = self.state
        ready = s.backend is not None
        return {"node_id": self.node_id, "cpu_usage": self.load.cpu_usage(),
                "memory_usage": self.load.memory_usage(), "active_requests": s.active_requests(),
                "average_response_time_ms": round(s.average_response_ms(), 1),
                "loaded_models": [s.model_name()] if ready else [],
                "initializing": not ready and not s.load_error, "ready_models": [int(ready), 1]}

    async def register(self, client: httpx.AsyncClient) -> bool:
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS)):
            await asyncio.sleep(delay)
            try:
                r = await client.post(f"{self.base}/api/nodes", json=self.registration())
            except httpx.HTTPError as e:
                log.warning("router registration attempt %d failed: %s", attempt + 1, e)
                continue
            if r.status_code == 403:
                log.error("the router at %s refused this node (403: it requires a GPU); "
                          "serving standalone", self.base)
                return False
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code in (200, 201) and body.get("node_id") and body.get("agent_token"):
                self.node_id, self.token = str(body["node_id"]), str(body["agent_token"])
                log.info("Registered with router %s as node %s", self.base, self.node_id)
                return True
            log.warning("router registration attempt %d failed: HTTP %d %s", attempt + 1,
                        r.status_code, r.text[:200])
        log.error("could not register with the router at %s; serving standalone", self.base)
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
                try:
                    r = await client.post(f"{self.base}/api/health", json=self.heartbeat(),
                                          headers={"X-Agent-Token": self.token})
                except httpx.HTTPError as e:
                    log.warning("heartbeat to the router failed: %s", e)
                    continue
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
        await RouterClient(state, state.config).run()


