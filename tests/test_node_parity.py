"""llama-server / OpenAI parity, against a real node serving the demo model (pyengine demo-model).

The request shapes are those of llama.cpp's server test suite (tools/server/tests: chat,
completions, tokenize, tool calls, security / API key, context size) and of the official openai
client, sent to the real engine, tokenizer and Harmony parser behind the HTTP node, started with
llama-server's habits (-c total split across -np, --alias, --api-key, --cors-origin). n > 1 is
checked against single requests (greedy: every choice equals the one greedy answer; seeded: choice
i equals a single request with seed + i), and the KV copy that lets choices share the prompt
against a fresh evaluation."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest
from node_server import run_node

from pyengine.demo_model import write_demo_model
from pyengine.engine import Engine
from pyengine.model_file import open_model
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend

openai = pytest.importorskip("openai")
KEY = "sk-test-parity"
N_CTX_TOTAL, N_SLOTS = 1024, 3
ORIGIN = "http://localhost:5173"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("demo") / "gpt-oss-demo.gguf", n_layer=2)


@pytest.fixture(scope="module")
def node(model_path):
    cfg = dict(model=str(model_path), parallel=N_SLOTS, ctx_size=N_CTX_TOTAL, threads=2, api_key=KEY,
               aliases=["my-gpt", "other-name"], cors_origins=[ORIGIN])
    backend = EngineBackend.load(NodeConfig(**cfg))
    cfg.pop("model")
    with run_node(backend, **cfg) as (url, state):
        yield url, backend, state


@pytest.fixture
def client(node):
    return openai.OpenAI(base_url=f"{node[0]}/v1", api_key=KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


# --- llama-server flags: -c is the total, --alias ----------------------------------------------

def test_ctx_size_is_split_across_slots_and_props_reports_both(node, model_path):
    url, backend, _ = node
    props = httpx.get(f"{url}/props", headers=auth()).json()
    assert props["n_ctx_slot"] == N_CTX_TOTAL // N_SLOTS == backend.info.n_ctx
    assert props["n_ctx"] == props["n_ctx_slot"] * N_SLOTS and props["total_slots"] == N_SLOTS
    assert props["model_alias"] == "my-gpt" and props["aliases"] == ["my-gpt", "other-name"]
    assert props["model_path"] == str(model_path) and props["chat_template"].startswith("{")
    assert props["model"]["arch"] in ("gpt-oss", "gptoss")
    mf = open_model(model_path)
    assert props["model"]["size_bytes"] == model_path.stat().st_size
    assert props["model"]["n_params"] == sum(int(np.prod(t.shape)) for t in mf.tensors.values())
    assert props["model"]["quantization"] in ("Q8_0", "MXFP4", "F32")
    assert props["build_info"]["version"] and props["build_info"]["cpu_features"]
    assert props["device"] == "cpu" and props["n_threads"] == 2
    assert props["cache_type_k"] == props["cache_type_v"] == "f16"  # llama.cpp's default
    assert props["webui"] is True  # the page is on unless --no-webui
    slots = httpx.get(f"{url}/slots", headers=auth()).json()
    assert [s["id"] for s in slots] == list(range(N_SLOTS))
    assert all(s["n_ctx"] == props["n_ctx_slot"] and not s["is_processing"] for s in slots)


def test_aliases_are_listed_retrievable_and_accepted(client, node):
    url = node[0]
    assert [m.id for m in client.models.list()] == ["my-gpt", "other-name"]
    assert client.models.retrieve("other-name").id == "other-name"
    assert client.models.retrieve("gpt-oss-demo").id == "my-gpt"  # the file's own names still answer
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-oss-120b")
    r = client.chat.completions.create(model="other-name", max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.model == "my-gpt"
    for path in ("/models", "/v1/models"):
        assert httpx.get(f"{url}{path}", headers=auth()).json()["data"][0]["id"] == "my-gpt"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


# --- routes without /v1, tokenize, apply-template ----------------------------------------------

def test_unprefixed_routes_answer_like_the_v1_ones(node):
    url = node[0]
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8, "temperature": 0}
    a = httpx.post(f"{url}/chat/completions", json=chat, headers=auth(), timeout=60).json()
    b = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=auth(), timeout=60).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] > 0
    comp = {"prompt": "I believe the meaning of life is", "max_tokens": 8, "temperature": 0}
    a = httpx.post(f"{url}/completions", json=comp, headers=auth(), timeout=60).json()
    b = httpx.post(f"{url}/v1/completions", json=comp, headers=auth(), timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["object"] == "text_completion"


def test_tokenize_and_apply_template(node):
    url, backend, _ = node
    text = "What is the capital of France? Grüße 🤖"
    tokens = httpx.post(f"{url}/tokenize", json={"content": text}, headers=auth()).json()["tokens"]
    assert tokens == backend.tokenize(text, special=True)
    back = httpx.post(f"{url}/detokenize", json={"tokens": tokens}, headers=auth()).json()["content"]
    assert back == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    r = httpx.post(f"{url}/apply-template", json={"messages": messages, "reasoning_effort": "low"},
                   headers=auth()).json()
    rendered = backend.render_chat([{"role": m["role"], "content": m["content"], "thinking": None,
                                     "tool_calls": None, "tool_call_id": None, "name": None} for m in messages],
                                   None, "low")
    assert r["prompt"] == backend.detokenize(rendered) and r["prompt"].endswith("<|start|>assistant")
    bad = httpx.post(f"{url}/apply-template", json={"messages": []}, headers=auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


# --- chat shapes, streaming, tool calls --------------------------------------------------------

def test_stream_first_chunk_is_role_with_null_content(client, node):
    chunks = list(client.chat.completions.create(model="my-gpt", stream=True, max_tokens=6,
                                                 messages=[{"role": "user", "content": "hello"}]))
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None
    raw = httpx.post(f"{node[0]}/v1/chat/completions", headers=auth(), timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 3})
    head = json.loads(raw.text.split("\n\n")[0].removeprefix("data: "))
    assert head["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_tool_call_request_shape_is_served(client):
    r = client.chat.completions.create(model="my-gpt", tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=16,
                                       messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
    r = client.chat.completions.create(model="my-gpt", tools=[WEATHER_TOOL], messages=history, max_tokens=8)
    assert r.usage.prompt_tokens > 0 and r.choices[0].message.role == "assistant"


# --- security: API key, CORS -------------------------------------------------------------------

@pytest.mark.parametrize("path, method", [("/props", "GET"), ("/slots", "GET"), ("/v1/models", "GET"),
                                          ("/models", "GET"), ("/v1/models/my-gpt", "GET"),
                                          ("/apply-template", "POST"), ("/chat/completions", "POST"),
                                          ("/completions", "POST"), ("/tokenize", "POST")])
def test_every_route_but_health_needs_the_key(node, path, method):
    url = node[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, f"{url}{path}", headers=headers, json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").status_code == 200


def test_cors_preflight_and_allowed_origins(node):
    url = node[0]
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(f"{url}/v1/chat/completions", headers=pre)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-stainless-os" in r.headers["access-control-allow-headers"]
    evil = httpx.options(f"{url}/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert evil.status_code == 204 and "access-control-allow-origin" not in evil.headers
    # the real request still needs the key; its answers (errors too) are readable by the page
    denied = httpx.get(f"{url}/props", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    ok = httpx.get(f"{url}/props", headers={"Origin": ORIGIN, **auth()})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in httpx.get(
        f"{url}/props", headers={"Origin": "http://evil.example", **auth()}).headers


# --- context size errors -----------------------------------------------------------------------

def test_context_size_error_is_llama_servers(node):
    url, backend, _ = node
    n_slot = backend.info.n_ctx
    r = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=60,
                   json={"prompt": "hello " * (n_slot + 10), "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == n_slot and err["n_prompt_tokens"] > n_slot
    # a prompt that fits ends with "length" when the slot fills up
    ids = backend.tokenize("hello " * (n_slot - 20))
    r = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=120,
                   json={"prompt": ids, "max_tokens": 1000, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= n_slot


# --- n > 1 -------------------------------------------------------------------------------------

def test_n_choices_greedy_all_equal_the_single_answer(client, node):
    messages = [{"role": "user", "content": f"Count to {random.randint(3, 9)}."}]
    one = client.chat.completions.create(model="my-gpt", messages=messages, max_tokens=10, temperature=0)
    many = client.chat.completions.create(model="my-gpt", messages=messages, max_tokens=10, temperature=0, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for c in many.choices:
        assert (c.message.content, c.message.model_extra.get("reasoning_content")) == \
            (one.choices[0].message.content, one.choices[0].message.model_extra.get("reasoning_content"))
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_choices_seeded_equal_single_requests_with_seed_plus_index(node):
    url = node[0]
    seed = random.randint(0, 10_000)
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": seed}
    many = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=120, json={**body, "n": 3}).json()
    texts = [c["text"] for c in sorted(many["choices"], key=lambda c: c["index"])]
    for i, text in enumerate(texts):
        single = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=120,
                            json={**body, "seed": seed + i}).json()
        assert single["choices"][0]["text"] == text, i
    assert len(set(texts)) > 1  # a random 201k-vocabulary model at temperature 1: choices differ


def test_n_choices_stream_carries_each_index_then_one_usage(node):
    url, backend, state = node
    body = {"messages": [{"role": "user", "content": "stream two"}], "max_tokens": 6, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    events = httpx.post(f"{url}/v1/chat/completions", headers=auth(), timeout=120, json=body).text
    payloads = [e.removeprefix("data: ") for e in events.strip().split("\n\n")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    finished = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finished) == [0, 1]
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and chunks[-1] is usage[0]
    text = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)}
    assert text[0] == text[1]
    # the follower slot was seeded from the leader's cache: it holds the whole prompt too
    slots = httpx.get(f"{url}/slots", headers=auth()).json()
    assert sum(s["n_prompt_tokens_cached"] >= usage[0]["usage"]["prompt_tokens"] for s in slots) >= 2


def test_n_larger_than_the_slots_is_400(node):
    r = httpx.post(f"{node[0]}/v1/completions", headers=auth(),
                   json={"prompt": "x", "n": N_SLOTS + 1, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_copied_cache_continues_exactly_like_a_fresh_evaluation(model_path):
    """Runner.copy_cache: a prompt longer than the sliding window (so the rings wrap), copied, then
    continued, gives exactly the logits of the same passes in a fresh cache."""
    rng = np.random.default_rng(random.randint(0, 2**31))
    eng = Engine(open_model(model_path), n_ctx=512, n_threads=2, n_batch=32)
    runner = eng.runner
    window = runner.model.window
    prompt = [int(t) for t in rng.integers(0, runner.n_vocab, window + 70)]
    more = [int(t) for t in rng.integers(0, runner.n_vocab, 5)]
    src, dst, fresh = (runner.new_cache(512) for _ in range(3))
    runner.eval([src], [prompt])
    runner.eval([dst], [[1, 2, 3]])  # stale content the copy must replace
    assert runner.copy_cache(src, dst) and dst.tokens == prompt
    got = runner.eval([dst], [more], logits_all=True)[0]
    runner.eval([fresh], [prompt])  # the same passes as src's, so the same numbers to the bit
    np.testing.assert_array_equal(got, runner.eval([fresh], [more], logits_all=True)[0])
    assert not runner.copy_cache(src, runner.new_cache(256))  # another shape: the caller evaluates


def test_chat_template_file_renders_chats(model_path, tmp_path):
    """--chat-template-file: chats (tool calls and tools in OpenAI's nesting) render through it."""
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "<|end|>{% endfor %}{% for t in tools or [] %}({{ t.function.name }}){% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
    backend = EngineBackend.load(NodeConfig(model=str(model_path), ctx_size=256, threads=1,
                                            chat_template_file=str(template)))
    city = random.choice(["Paris", "Köln", "Tōkyō"])
    messages = [{"role": "user", "content": f"Weather in {city}?", "thinking": None, "tool_calls": None,
                 "tool_call_id": None, "name": None},
                {"role": "assistant", "content": "", "thinking": None, "tool_call_id": None, "name": None,
                 "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": json.dumps({"city": city})}]}]
    ids = backend.render_chat(messages, [WEATHER_TOOL["function"]], "low")
    want = (f"<|start|>user<|message|>Weather in {city}?<|end|><|start|>assistant<|message|>"
            f"[get_weather {json.dumps({'city': city}, ensure_ascii=False)}]<|end|>(get_weather)<|start|>assistant")
    assert backend.detokenize(ids) == want and backend.chat_template_text() == template.read_text()


def test_n_choices_without_a_copyable_cache_evaluate_the_prompt_each(node, monkeypatch):
    """Where copy_cache declines (CUDA caches), every choice evaluates the prompt itself: same answers."""
    url, backend, _ = node
    monkeypatch.setattr(backend.core.runner, "copy_cache", lambda src, dst: False)
    body = {"prompt": f"The weather on day {random.randint(1, 99)}", "max_tokens": 6, "temperature": 0}
    one = httpx.post(f"{url}/v1/completions", json=body, headers=auth(), timeout=120).json()
    two = httpx.post(f"{url}/v1/completions", json={**body, "n": 2}, headers=auth(), timeout=120).json()
    assert [c["text"] for c in two["choices"]] == [one["choices"][0]["text"]] * 2
    assert two["usage"]["completion_tokens"] == 2 * one["usage"]["completion_tokens"]


def test_copy_cache_declines_caches_that_keep_their_rows_another_way(tmp_path, monkeypatch):
    """The n > 1 choices copy a cache only into one of the same context that keeps its rows the same
    way: a CUDA cache's (on the CUDA emulator: the kernels' own source compiled for the CPU) into
    a CPU cache, or into one of another context, is declined, and the choice evaluates the prompt
    itself; between two CUDA caches it is a copy (continuations: tests/test_cuda_engine.py). With
    one K/V head the two kinds' row arrays have the same shapes: only the row format tells them apart."""
    from gguf_factory import write_gptoss_gguf

    monkeypatch.setenv("PYENGINE_CUDA_EMULATOR", "1")
    path = tmp_path / "one-kv-head.gguf"
    write_gptoss_gguf(path, arch="gpt-oss", n_head_kv=1, seed=3)
    gpu = Engine(open_model(path), n_ctx=64, n_threads=1, device="cuda")
    cpu = Engine(open_model(path), n_ctx=64, n_threads=1)
    assert gpu._cache.native.row_shapes(3) == cpu._cache.native.row_shapes(3)
    src = gpu.runner.new_cache(64)
    gpu.runner.eval([src], [[1, 2, 3]])
    for dst in (cpu.runner.new_cache(64), gpu.runner.new_cache(32)):
        assert not gpu.runner.copy_cache(src, dst) and dst.n_past == 0
    dst = gpu.runner.new_cache(64)
    assert gpu.runner.copy_cache(src, dst) and dst.tokens == [1, 2, 3]
