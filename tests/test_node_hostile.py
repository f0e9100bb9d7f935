"""The node under hostile clients (issue 18), over HTTP against a real node serving the demo model:
racing and malicious /pull requests, oversized and pathological bodies, stop-string limits, the
API key kept out of `ps`, and a vanishing client logged as one info line."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from node_server import free_port, run_node, serve_app, wait_ready

from pyengine.demo_model import write_demo_model
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend
from pyengine.stops import MAX_STOP_CHARS, MAX_STOPS

BODY_LIMIT = 256 << 10
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/pull")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "gpt-oss-demo.gguf")


def demo_node(demo: Path, **cfg):
    backend = EngineBackend.load(NodeConfig(model=str(demo), parallel=2, ctx_size=2048, threads=2))
    return run_node(backend, parallel=2, **cfg)


@pytest.fixture(scope="module")
def node(demo, tmp_path_factory):
    """A node with a small body limit and one pull source folder; yields (url, models, shared, state)."""
    root = tmp_path_factory.mktemp("node")
    models, shared = root / "models", root / "shared"
    shared.mkdir()
    with demo_node(demo, models_dir=models, max_body_bytes=BODY_LIMIT, pull_sources=(shared,)) as (url, state):
        yield url, models, shared, state


def wait_pull(url: str, model: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/pull/{model}").json()
        if state["status"] != "running":
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def leftovers(models: Path) -> list[Path]:
    return [p for p in models.rglob("*") if ".part" in p.name]


def slow_file_server(blob: bytes, chunks: int, pause: float) -> FastAPI:
    app = FastAPI()

    @app.get("/model.gguf")
    async def model() -> StreamingResponse:
        async def body():
            step = -(-len(blob) // chunks)
            for i in range(0, len(blob), step):
                yield blob[i:i + step]
                await asyncio.sleep(pause)
        return StreamingResponse(body(), headers={"content-length": str(len(blob))})

    return app


def test_a_second_pull_of_a_running_id_is_refused_and_the_file_is_never_mixed(node):
    url, models, shared, _ = node
    first, other = os.urandom(3 << 20), os.urandom(3 << 20)
    (shared / "other.gguf").write_bytes(other)
    with serve_app(slow_file_server(first, 6, 0.3), free_port()) as files:
        r = httpx.post(f"{url}/pull", json={"model": "race", "download_url": f"{files}/model.gguf"})
        assert r.status_code == 200, r.text
        time.sleep(0.4)
        r = httpx.post(f"{url}/pull", json={"model": "race", "path": str(shared / "other.gguf")})
        assert r.status_code == 409 and r.json()["error"]["param"] == "model"
        assert httpx.get(f"{url}/pull/race").json()["status"] == "running"
        assert wait_pull(url, "race") == {"model": "race", "status": "done", "progress": 1.0}
    target = models / "race_latest" / "model.gguf"
    assert target.read_bytes() == first
    r = httpx.post(f"{url}/pull", json={"model": "race", "path": str(shared / "other.gguf"),
                                        "size": len(other), "digest": "sha256:" + hashlib.sha256(other).hexdigest()})
    assert r.status_code == 200 and wait_pull(url, "race")["status"] == "done"
    assert target.read_bytes() == other and not leftovers(models)


def test_a_pull_that_does_not_match_the_routers_size_or_digest_never_goes_live(node):
    url, models, shared, _ = node
    blob = os.urandom(1 << 20)
    (shared / "blob.gguf").write_bytes(blob)
    for model, extra in (("bad-size", {"size": len(blob) + 1}), ("bad-digest", {"digest": "0" * 64})):
        r = httpx.post(f"{url}/pull", json={"model": model, "path": str(shared / "blob.gguf"), **extra})
        assert r.status_code == 200
        state = wait_pull(url, model)
        assert state["status"] == "failed" and ("router said" in state["error"] or "digest" in state["error"])
        assert not (models / f"{model}_latest").exists()
    assert not leftovers(models)
    assert httpx.post(f"{url}/pull", json={"model": "m", "path": str(shared / "blob.gguf"),
                                           "digest": "md5:abc"}).status_code == 400


def test_pull_requests_that_cannot_work_are_refused_before_they_start(node, tmp_path):
    url, models, shared, _ = node
    (shared / "ok.gguf").write_bytes(b"GGUF")
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"secret")
    (shared / "link.gguf").symlink_to(outside)
    cases = [({"model": "m" * 300, "path": str(shared / "ok.gguf")}, 400, "model"),
             ({"model": "a\u0007b", "path": str(shared / "ok.gguf")}, 400, "model"),
             ({"model": "m", "download_url": "http://127.0.0.1:99999/m.gguf"}, 400, "download_url"),
             ({"model": "m", "path": "/proc/self/environ"}, 403, "path"),
             ({"model": "m", "path": str(outside)}, 403, "path"),
             ({"model": "m", "path": str(shared / "link.gguf")}, 403, "path"),  # a link out of the folder
             ({"model": "m", "path": os.path.join(shared, os.path.relpath(outside, shared))}, 403, "path")]
    for body, status, param in cases:
        r = httpx.post(f"{url}/pull", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(f"{url}/pull", content=b'{"model": "\\ud800", "path": "x"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/pull/never-pulled").status_code == 404
    assert not (models / "m_latest").exists()


def test_pull_never_follows_a_symlink_in_the_models_folder(node, tmp_path):
    url, models, shared, _ = node
    (shared / "m.gguf").write_bytes(b"new model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    models.mkdir(exist_ok=True)
    (models / "evil_latest").symlink_to(elsewhere)
    assert httpx.post(f"{url}/pull", json={"model": "evil", "path": str(shared / "m.gguf")}).status_code == 200
    state = wait_pull(url, "evil")
    assert state["status"] == "failed" and "not a plain folder" in state["error"]
    assert list(elsewhere.iterdir()) == []
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (models / "plant_latest").mkdir()
    (models / "plant_latest" / "model.gguf").symlink_to(victim)
    assert httpx.post(f"{url}/pull", json={"model": "plant", "path": str(shared / "m.gguf")}).status_code == 200
    assert wait_pull(url, "plant")["status"] == "done"
    target = models / "plant_latest" / "model.gguf"
    assert not target.is_symlink() and target.read_bytes() == b"new model" and victim.read_text() == "keep me"


def test_path_pulls_are_off_by_default_and_leftovers_are_cleaned_at_start(demo, tmp_path):
    models = tmp_path / "models"
    (models / "dead_latest").mkdir(parents=True)
    (models / "dead_latest" / "model.gguf.0123456789abcdef.part").write_bytes(b"half")
    (models / "kept_latest").mkdir()
    (models / "kept_latest" / "model.gguf").write_bytes(b"model")
    (models / "kept_latest" / "model.gguf.part").write_bytes(b"half")
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    with demo_node(demo, models_dir=models) as (url, _):
        r = httpx.post(f"{url}/pull", json={"model": "m", "path": str(src)})
        assert r.status_code == 403 and "--pull-source" in r.json()["error"]["message"]
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*")) == ["kept_latest",
                                                                                  "kept_latest/model.gguf"]


def test_request_bodies_are_bounded_and_pathological_json_is_a_400(node):
    url, _, _, _ = node
    big = {"content": "x" * BODY_LIMIT}
    for route in POST_ROUTES:
        r = httpx.post(f"{url}{route}", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", route

        def chunked():
            for _ in range(BODY_LIMIT // 4096 + 1):
                yield b" " * 4096
        r = httpx.post(f"{url}{route}", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413, route
        r = httpx.post(f"{url}{route}", content=b"[" * 100000, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], (route, r.text)
        nested = '{"model": "x", "messages": ' + "[" * 200 + "]" * 200 + "}"
        r = httpx.post(f"{url}{route}", content=nested.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, (route, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "\\udc00", "messages": []}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    word = "abcdefghijklmnopqrstuvwxyz" * (BODY_LIMIT // 32)  # one long word just under the limit
    r = httpx.post(f"{url}/tokenize", json={"content": word}, timeout=60)
    assert r.status_code == 200
    r = httpx.post(f"{url}/detokenize", json={"tokens": r.json()["tokens"]}, timeout=60)
    assert r.json()["content"] == word


def test_stop_strings_are_limited_like_openai(node):
    url, _, _, _ = node
    base = {"prompt": "x", "max_tokens": 8, "temperature": 0}
    for stop in (["b"] * (MAX_STOPS + 1), ["b" * (MAX_STOP_CHARS + 1)], ["b" * 10000] * 3 + ["a" * 10000]):
        r = httpx.post(f"{url}/v1/completions", json={**base, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    r = httpx.post(f"{url}/v1/completions", json={**base, "stop": ["é" * MAX_STOP_CHARS] * MAX_STOPS}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_vanished_client_is_one_info_line(node, caplog):
    """A client that leaves while its request waits for a slot (both slots busy)."""
    url, _, _, state = node
    host, port = url.removeprefix("http://").split(":")
    long = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "logit_bias": {"117525": 100}}
    busy = [threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                             kwargs={"json": long, "timeout": 300}) for _ in range(2)]
    for t in busy:
        t.start()
    deadline = time.monotonic() + 20
    while state.scheduler.n_active() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = b'{"prompt": "x", "max_tokens": 5}'
    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to the root logger
    uvicorn_log.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while "client disconnected" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        for t in busy:
            t.join()
        time.sleep(0.3)
    uvicorn_log.removeHandler(caplog.handler)
    assert caplog.text.count("client disconnected") == 1
    assert "Exception in ASGI application" not in caplog.text and "Traceback" not in caplog.text
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("how", ["env", "file"])
def test_the_api_key_can_stay_out_of_the_command_line(demo, tmp_path, how):
    key = "k-" + os.urandom(8).hex()
    port = free_port()
    env = {**os.environ, "LLM_NODE_LOG_LEVEL": "info"}
    args = [sys.executable, "-m", "pyengine.cli", "serve", "--model", str(demo), "--port", str(port),
            "--ctx-size", "256", "--threads", "1"]
    if how == "env":
        env["LLM_NODE_API_KEY"] = key
    else:
        (tmp_path / "key").write_text(key + "\n")
        args += ["--api-key-file", str(tmp_path / "key")]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, timeout=60)
        assert key not in " ".join(args)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    r = subprocess.run([sys.executable, "-m", "pyengine.cli", "serve", "--model", str(demo),
                        "--api-key-file", str(tmp_path / "missing")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("[ERROR] cannot read --api-key-file")
    assert "Traceback" not in r.stderr
