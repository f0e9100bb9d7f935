"""The node as the README's demo shows it, over HTTP from a `pyengine serve` process: the README's
openai snippet runs as written against it, its SSE stream carries the text as it is generated
(the demo's replies have no Harmony header), a busy port is one `[ERROR]` line with nothing
loaded, and Ctrl-C stops it even when it was started with SIGINT ignored (a background job)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from node_server import free_port, wait_ready

from pyengine.demo_model import write_demo_model

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8081"


def serve(cwd: Path, port: int, sigint=signal.SIG_DFL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyengine.cli", "serve", "--model", "demo.gguf",
                             "--port", str(port), "--ctx-size", "512", "--threads", "1"],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo")
    write_demo_model(folder / "demo.gguf")
    return folder


@pytest.fixture(scope="module")
def node(demo_dir):
    port = free_port()
    proc = serve(demo_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        yield url
    finally:
        stop(proc)


def test_the_readme_openai_snippet_runs_as_written(node, capsys):
    openai = pytest.importorskip("openai")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    snippet = next(b for b in blocks if "from openai import OpenAI" in b)
    assert README_URL in snippet
    model = re.search(r'model="([^"]+)"', snippet).group(1)
    ids = {m["id"] for m in httpx.get(f"{node}/v1/models").json()["data"]}
    aliases = {a for m in httpx.get(f"{node}/v1/models").json()["data"] for a in m.get("aliases", [])}
    assert model in ids | aliases, (model, ids, aliases)
    scope = {}
    exec(snippet.replace(README_URL, node), scope)
    r = scope["r"]
    assert isinstance(r, openai.types.chat.ChatCompletion) and r.usage.completion_tokens <= 64
    assert r.choices[0].message.content or r.choices[0].message.reasoning_content
    assert capsys.readouterr().out.strip()  # the streamed loop printed the reply


def test_sse_carries_text_as_it_is_generated(node):
    """Each content delta holds the text of about one token; a parser that held header-less text
    until the end would send one delta with all of it."""
    deltas, finish = [], None
    body = {"model": "demo", "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{node}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                text = choice["delta"].get("content") or choice["delta"].get("reasoning_content")
                if text:
                    deltas.append(text)
                finish = choice.get("finish_reason") or finish
    if finish == "length":
        assert len(deltas) >= usage["completion_tokens"] // 2, (len(deltas), usage)
    assert len(deltas) > 1 or usage["completion_tokens"] <= 2, deltas


def test_a_busy_port_is_one_error_line_and_nothing_loads(demo_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = serve(demo_dir, port)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            stop(proc)
    assert proc.returncode == 1 and err == f"[ERROR] port {port} is in use\n", err


def test_ctrl_c_stops_a_node_started_with_sigint_ignored(demo_dir):
    port = free_port()
    proc = serve(demo_dir, port, sigint=signal.SIG_IGN)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        stop(proc)
