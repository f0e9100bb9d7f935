"""Registration, heartbeat and /pull against a fake host router that follows the router's contract
(docs router-node.md): it probes the node's /v1/models on runtime_port + 1 before accepting."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from node_scripted import ScriptedBackend
from node_server import free_port, run_node, serve_app

from pyengine.node import router_client
from pyengine.node.router_client import run_router_client


class FakeRouter:
    def __init__(self, refuse: int | None = None, fail_first: int = 0) -> None:
        self.registrations: list[dict] = []
        self.probes: list[int] = []
        self.heartbeats: list[tuple[str | None, dict]] = []
        self.progress: list[tuple[str, float]] = []
        self.refuse = refuse
        self.fail_first = fail_first
        self.forget = False
        self.app = FastAPI()

        @self.app.post("/api/nodes")
        async def nodes(request: Request) -> JSONResponse:
            body = await request.json()
            self.registrations.append(body)
            if self.refuse:
                return JSONResponse({"error": "GPU required"}, self.refuse)
            if len(self.registrations) <= self.fail_first:
                return JSONResponse({"error": "busy"}, 500)
            async with httpx.AsyncClient() as c:
                probe = await c.get(f"http://{body['ip_address']}:{body['runtime_port'] + 1}/v1/models")
            self.probes.append(probe.status_code)
            if probe.status_code != 200 or not probe.json()["data"][0]["id"]:
                return JSONResponse({"error": "node unreachable"}, 400)
            return JSONResponse({"node_id": f"node-{len(self.registrations)}", "agent_token": "tok-xyz",
                                 "status": "pending"}, 201)

        @self.app.post("/api/health")
        async def health(request: Request) -> JSONResponse:
            if self.forget:
                self.forget = False
                return JSONResponse({"error": "unknown node"}, 404)
            self.heartbeats.append((request.headers.get("x-agent-token"), await request.json()))
            return JSONResponse({}, 200)

        @self.app.post("/api/tasks/{task_id}/progress")
        async def progress(task_id: str, request: Request) -> JSONResponse:
            self.progress.append((task_id, (await request.json())["progress"]))
            return JSONResponse({}, 200)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(router_client, "RETRY_DELAYS", (0.05, 0.05, 0.05))


def node_with_router(router: FakeRouter, **cfg):
    return run_node(ScriptedBackend(), start_router=run_router_client, router_url=router.url,
                    heartbeat_secs=0.1, advertise_ip="127.0.0.1", **cfg)


def test_registers_after_probe_and_sends_heartbeats():
    router = FakeRouter(fail_first=1)
    with serve_app(router.app, free_port()) as router.url, node_with_router(router) as (url, _):
        wait_for(lambda: len(router.heartbeats) >= 2)
        reg = router.registrations[-1]
        port = int(url.rsplit(":", 1)[1])
        assert reg["runtime_port"] == port - 1 and reg["ip_address"] == "127.0.0.1"
        assert reg["gpu_available"] is False and reg["gpu_devices"] == [] and reg["machine_name"]
        assert len(router.registrations) == 2 and router.probes == [200]
        token, beat = router.heartbeats[-1]
        assert token == "tok-xyz" and beat["node_id"] == "node-2"
        assert beat["loaded_models"] == ["scripted-oss"] and beat["ready_models"] == [1, 1]
        assert beat["initializing"] is False and beat["active_requests"] == 0
        assert 0 <= beat["cpu_usage"] <= 100 and 0 < beat["memory_usage"] <= 100

        router.forget = True
        wait_for(lambda: len(router.registrations) == 3 and len(router.heartbeats) >= 4)
        assert router.heartbeats[-1][1]["node_id"] == "node-3"


def test_router_refusal_leaves_node_serving(caplog):
    router = FakeRouter(refuse=403)
    with serve_app(router.app, free_port()) as router.url, node_with_router(router) as (url, _):
        wait_for(lambda: "requires a GPU" in caplog.text)
        time.sleep(0.3)
        assert len(router.registrations) == 1 and router.heartbeats == []
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "still here"}]})
        assert r.json()["choices"][0]["message"]["content"] == "You said: still here"


def test_pull_copies_into_router_layout_and_reports_progress(tmp_path):
    router = FakeRouter()
    src = tmp_path / "shared" / "blob.gguf"
    src.parent.mkdir()
    src.write_bytes(bytes(range(256)) * 40000)
    models = tmp_path / "models"
    with serve_app(router.app, free_port()) as router.url, \
            node_with_router(router, models_dir=models) as (url, _):
        r = httpx.post(f"{url}/pull", json={"model": "gpt-oss:20b", "task_id": "t-1", "path": str(src)})
        assert r.json() == {"status": "accepted"}
        target = models / "gpt-oss_20b" / "model.gguf"
        wait_for(lambda: target.exists() and router.progress and router.progress[-1][1] == 1.0)
        assert target.read_bytes() == src.read_bytes()
        assert all(t == "t-1" for t, _ in router.progress)
        assert httpx.post(f"{url}/pull", json={"model": "x"}).status_code == 400
        httpx.post(f"{url}/pull", json={"model": "gpt-oss", "path": str(tmp_path / "missing.gguf")})
        time.sleep(0.2)
        assert not (models / "gpt-oss_latest" / "model.gguf").exists()
        assert not list(models.glob("*/*.part"))
