"""The node as a process: flags, a failed model load, and a clean stop on SIGTERM mid-stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from node_server import free_port, wait_ready

TESTS = Path(__file__).resolve().parent


def test_serve_command_and_entry_point_share_flags(tmp_path):
    for cmd in ([sys.executable, "-m", "pyengine.cli", "serve", "--help"],
                [sys.executable, "-m", "pyengine.node.cli", "--help"]):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        for flag in ("--model", "--host", "--port", "--models-dir", "--ctx-size", "--parallel", "--threads",
                     "--api-key", "--verbose", "--alias", "--cors-origin", "--chat-template-file", "--jinja"):
            assert flag in out
        assert "split evenly across the --parallel" in " ".join(out.split())


def test_llama_server_flags_reach_the_config_and_bad_ones_are_one_error_line(tmp_path, monkeypatch):
    from pyengine.demo_model import write_demo_model
    from pyengine.node import cli

    seen = {}
    monkeypatch.setattr(cli, "serve", lambda config, load: seen.setdefault("config", config) and 0)
    model = str(tmp_path / "m.gguf")
    assert cli.main(["-m", model, "-c", "4096", "-np", "4", "-a", "first", "--alias", "second", "--jinja",
                     "--cors-origin", "http://a.example", "--cors-origin", "*"]) == 0
    c = seen["config"]
    assert (c.ctx_size, c.parallel, c.aliases, c.jinja) == (4096, 4, ["first", "second"], True)
    assert c.cors_origins == ["http://a.example", "*"]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}")  # does not compile
    write_demo_model(model, n_layer=1)
    for argv, message in ((["-c", "32", "-np", "4"], "at least 16 per slot"),
                          (["--alias", " "], "--alias must not be empty")):
        proc = subprocess.run([sys.executable, "-m", "pyengine.node.cli", "-m", model, *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("[ERROR] "), proc.stderr
        assert message in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pyengine.node.cli", "-m", model, "--port", str(free_port()),
                           "--chat-template-file", str(template)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1 and "[ERROR] --chat-template-file" in proc.stderr, proc.stderr


def test_unloadable_model_exits_1_with_an_error_line(tmp_path):
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"GGUF but not really")
    proc = subprocess.run([sys.executable, "-m", "pyengine.node.cli", "--model", str(bogus),
                           "--port", str(free_port())], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1
    assert any(line.startswith("[ERROR] ") for line in proc.stderr.splitlines()), proc.stderr


SERVER = textwrap.dedent("""
    import sys
    from node_scripted import ScriptedBackend
    from pyengine.log import configure
    from pyengine.node.cli import serve
    from pyengine.node.config import NodeConfig
    configure(True)
    backend = ScriptedBackend(delay=0.01, script=lambda p: "<|channel|>final<|message|>" + "go " * 5000 + "<|return|>")
    sys.exit(serve(NodeConfig(model="scripted-oss", port=int(sys.argv[1]), parallel=2, verbose=True),
                   lambda: backend))
""")


def test_sigterm_ends_streams_with_an_error_chunk_and_exits(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, timeout=30)
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 3}).status_code == 200
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["error"]["code"] == 503
        assert proc.wait(timeout=20) == -signal.SIGTERM  # uvicorn re-raises the signal once stopped
        assert time.monotonic() - t0 < 10
        err = proc.stderr.read()
        assert "prompt eval time = " in err and "eval time = " in err and "tokens per second" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
