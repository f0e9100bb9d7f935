"""Eight concurrent streaming clients (the official openai client) on a node with fewer slots than
clients, and the /metrics exposition read back with prometheus_client's own parser.

The model is the scripted test double (tests/node_scripted.py): each answer is known from its
prompt, so every stream can be checked token-exact while the extra clients wait in the queue."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
from node_scripted import ScriptedBackend
from node_server import run_node

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")

N_CLIENTS, N_SLOTS = 8, 3


def families(url: str) -> dict[str, object]:
    text = httpx.get(f"{url}/metrics").text
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str | None = None, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


def test_eight_streaming_clients_complete_with_three_slots_and_metrics_parse():
    backend = ScriptedBackend(delay=0.01)
    with run_node(backend, parallel=N_SLOTS) as (url, _):
        peaks = {"queue": 0.0, "busy": 0.0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                fams = families(url)
                peaks["queue"] = max(peaks["queue"], sample(fams, "pyengine_queue_depth"))
                peaks["busy"] = max(peaks["busy"], sample(fams, "pyengine_requests_processing"))
                time.sleep(0.01)

        def chat(i: int) -> tuple[str, str, list, object]:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model="scripted-oss", messages=[{"role": "user", "content": f"client {i} — ünïcode ✓"}],
                stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            return content, reasoning, finish, chunks[-1].usage

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(N_CLIENTS) as pool:
            results = list(pool.map(chat, range(N_CLIENTS)))
        stop.set()
        watcher.join(5)

        for i, (content, reasoning, finish, usage) in enumerate(results):
            msg = f"client {i} — ünïcode ✓"
            assert content == f"You said: {msg}"
            assert reasoning == f"The user wrote {msg!r}. Answer briefly."
            assert finish == ["stop"]
            scripted = backend.tokenize(backend.script(f"<|start|>user<|message|>{msg}<|end|>"), special=True)
            assert usage.completion_tokens == len(scripted)
        assert peaks["busy"] == N_SLOTS and peaks["queue"] >= 1

        fams = families(url)
        assert fams["pyengine_requests"].type == "counter"
        assert sample(fams, "pyengine_requests", "pyengine_requests_total", endpoint="chat", outcome="ok") == N_CLIENTS
        assert sample(fams, "pyengine_generated_tokens", "pyengine_generated_tokens_total") == \
            sum(r[3].completion_tokens for r in results)
        assert sample(fams, "pyengine_prompt_tokens", "pyengine_prompt_tokens_total") == \
            sum(r[3].prompt_tokens for r in results)
        assert sample(fams, "pyengine_prompt_tokens_cached", "pyengine_prompt_tokens_cached_total") == \
            sum(r[3].prompt_tokens_details.cached_tokens for r in results)
        ttft = fams["pyengine_time_to_first_token_seconds"]
        assert ttft.type == "histogram"
        assert sample(fams, ttft.name, f"{ttft.name}_count") == N_CLIENTS
        assert sample(fams, ttft.name, f"{ttft.name}_bucket", le="+Inf") == N_CLIENTS
        buckets = [s.value for s in ttft.samples if s.name.endswith("_bucket")]
        assert buckets == sorted(buckets)
        tpot = "pyengine_time_per_output_token_seconds"
        assert sample(fams, tpot, f"{tpot}_count") == sum(r[3].completion_tokens - 1 for r in results)
        assert sample(fams, "pyengine_queue_depth") == 0 and sample(fams, "pyengine_requests_processing") == 0
        assert sample(fams, "pyengine_slots_total") == N_SLOTS
        assert 0 < sample(fams, "pyengine_kv_cache_usage_ratio") <= 1
        assert fams["pyengine_expert_selections"].type == "counter"
        experts = {(s.labels["layer"], s.labels["expert"]): s.value for s in fams["pyengine_expert_selections"].samples}
        assert experts == {(str(layer), str(e)): n for layer, row in enumerate(backend.expert_counts())
                           for e, n in enumerate(row)}
