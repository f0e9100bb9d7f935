"""Registration, heartbeat and /pull against a fake host router that follows the router's contract
(docs router-node.md): it probes the node's /v1/models on runtime_port + 1 before accepting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from node_scripted import ScriptedBackend
from node_server import free_port, run_node, serve_app

from pyengine import __version__
from pyengine.node import router_client
from pyengine.node.router_client import GpuProbe, run_router_client

TESTS = Path(__file__).resolve().parent
REGISTRATION_FIELDS = {"machine_name", "ip_address", "runtime_version", "runtime_port", "gpu_available",
                       "gpu_devices"}
HEARTBEAT_FIELDS = {"node_id", "cpu_usage", "memory_usage", "active_requests", "average_response_time_ms",
                    "loaded_models", "initializing", "ready_models"}
GPU_FIELDS = {"gpu_usage", "gpu_memory_usage", "gpu_memory_total_mb", "gpu_memory_used_mb", "gpu_model_name",
              "gpu_compute_capability"}


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
def quick_retries_no_gpu(monkeypatch):
    monkeypatch.setattr(router_client, "RETRY_DELAYS", (0.05, 0.05, 0.05))
    monkeypatch.setattr(GpuProbe, "COMMAND", "no-such-nvidia-smi")


def memory_percent() -> float:
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return 100.0 * (1 - info["MemAvailable"] / info["MemTotal"])


def node_with_router(router: FakeRouter, **cfg):
    return run_node(ScriptedBackend(), start_router=run_router_client, router_url=router.url,
                    heartbeat_secs=0.1, advertise_ip="127.0.0.1", **cfg)


def test_registers_after_probe_and_sends_heartbeats():
    router = FakeRouter(fail_first=1)
    with serve_app(router.app, free_port()) as router.url, node_with_router(router) as (url, _):
        wait_for(lambda: len(router.heartbeats) >= 2)
        reg = router.registrations[-1]
        port = int(url.rsplit(":", 1)[1])
        assert set(reg) == REGISTRATION_FIELDS
        assert reg["runtime_port"] == port - 1 and reg["ip_address"] == "127.0.0.1"
        assert reg["machine_name"] == socket.gethostname() and reg["runtime_version"] == __version__
        assert reg["gpu_available"] is False and reg["gpu_devices"] == []
        assert len(router.registrations) == 2 and router.probes == [200]
        token, beat = router.heartbeats[-1]
        assert set(beat) == HEARTBEAT_FIELDS  # no GPU here, so none of the optional gpu_* figures
        assert token == "tok-xyz" and beat["node_id"] == "node-2"
        assert beat["loaded_models"] == ["scripted-oss"] and beat["ready_models"] == [1, 1]
        assert beat["initializing"] is False and beat["active_requests"] == 0
        assert beat["average_response_time_ms"] == 0
        assert isinstance(beat["cpu_usage"], float) and 0 <= beat["cpu_usage"] <= 100
        assert abs(beat["memory_usage"] - memory_percent()) < 5

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
            node_with_router(router, models_dir=models, pull_sources=(src.parent,)) as (url, _):
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


def test_heartbeat_counts_running_and_waiting_requests_and_response_time():
    router = FakeRouter()
    backend = ScriptedBackend(delay=0.02)
    with serve_app(router.app, free_port()) as router.url, \
            run_node(backend, start_router=run_router_client, router_url=router.url, heartbeat_secs=0.05,
                     advertise_ip="127.0.0.1", parallel=1) as (url, _):
        wait_for(lambda: router.heartbeats)
        body = {"messages": [{"role": "user", "content": "busy " * 20}]}
        threads = [threading.Thread(target=httpx.post, args=(f"{url}/v1/chat/completions",),
                                    kwargs={"json": body, "timeout": 30}) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: router.heartbeats[-1][1]["active_requests"] == 2)  # one running, one queued
        for t in threads:
            t.join()
        wait_for(lambda: router.heartbeats[-1][1]["active_requests"] == 0)
        assert router.heartbeats[-1][1]["average_response_time_ms"] > 100  # two requests of > 40 steps


FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$1" = "--query-gpu=name,memory.total,memory.used,utilization.gpu,compute_cap" ] || exit 2
echo "NVIDIA H100 80GB HBM3, 81559, 1024, 30, 9.0"
echo "NVIDIA H100 80GB HBM3, 81559, 3072, 50, 9.0"
"""


def test_gpu_figures_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI)
    smi.chmod(0o755)
    monkeypatch.setattr(GpuProbe, "COMMAND", str(smi))
    router = FakeRouter()
    with serve_app(router.app, free_port()) as router.url, node_with_router(router):
        wait_for(lambda: router.heartbeats)
        reg = router.registrations[-1]
        assert reg["gpu_available"] is True and reg["gpu_count"] == 2 and reg["gpu_model"] == "NVIDIA H100 80GB HBM3"
        assert reg["gpu_devices"] == [{"model": "NVIDIA H100 80GB HBM3", "count": 2, "memory": 81559 * 2 ** 20}]
        beat = router.heartbeats[-1][1]
        assert set(beat) == HEARTBEAT_FIELDS | GPU_FIELDS
        assert beat["gpu_usage"] == 40.0 and beat["gpu_memory_total_mb"] == 2 * 81559
        assert beat["gpu_memory_used_mb"] == 4096 and beat["gpu_memory_usage"] == round(100 * 4096 / (2 * 81559), 1)
        assert beat["gpu_model_name"] == "NVIDIA H100 80GB HBM3" and beat["gpu_compute_capability"] == "9.0"


NODE_PROCESS = textwrap.dedent("""
    import sys
    from node_scripted import ScriptedBackend
    from pyengine import cli as pyengine_cli
    from pyengine.node import cli
    cli.load_engine_backend = lambda config: ScriptedBackend()
    sys.exit(pyengine_cli.main(sys.argv[1:]) if sys.argv[1] == "serve" else cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("entry", [["serve"], []], ids=["pyengine serve", "llm-router-node"])
def test_router_url_flag_wins_over_the_environment(entry, tmp_path):
    router = FakeRouter()
    with serve_app(router.app, free_port()) as router.url:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(TESTS), "LLM_ROUTER_URL": f"http://127.0.0.1:{free_port()}",
               "LLM_NODE_IP": "127.0.0.1", "LLM_NODE_HEARTBEAT_SECS": "0.1"}
        proc = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, *entry, "--model", "scripted-oss",
                                 "--port", str(port), "--router-url", router.url],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: router.heartbeats or proc.poll() is not None, timeout=60)
            assert proc.poll() is None, proc.stderr.read()
            assert router.registrations[0]["runtime_port"] == port - 1 and router.probes == [200]
            assert router.heartbeats[0][0] == "tok-xyz"
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_a_failing_nvidia_smi_means_no_gpu(tmp_path, monkeypatch, caplog):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    smi.chmod(0o755)
    monkeypatch.setattr(GpuProbe, "COMMAND", str(smi))
    probe = GpuProbe()
    assert probe.read() == [] and probe.read() == []
    assert caplog.text.count("could not read the GPUs") == 1
    assert GpuProbe.devices([]) == [] and GpuProbe.heartbeat_fields([]) == {}


def test_pull_refuses_what_it_cannot_fetch(tmp_path):
    with run_node(ScriptedBackend(), models_dir=tmp_path / "models", pull_sources=(tmp_path,)) as (url, _):
        for body, param in (({"model": "m", "path": str(tmp_path / "missing.gguf")}, "path"),
                            ({"model": "m", "path": "/dev/zero"}, "path"),
                            ({"model": "m", "path": "~no-such-user/model.gguf"}, "path"),
                            ({"model": "m", "download_url": "http\r://x"}, "download_url"),
                            ({"model": "m", "download_url": "ftp://host/model.gguf"}, "download_url"),
                            ({"model": "../up", "download_url": "http://127.0.0.1:9/m.gguf"}, "model")):
            r = httpx.post(f"{url}/pull", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*"))
