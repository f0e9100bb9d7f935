"""The node's HTTP layer through the official openai client and raw httpx.

The model is ScriptedBackend (tests/node_scripted.py): a unit-test double that replays a Harmony
token stream, tokenised, rendered and parsed by openai-harmony on the real o200k vocabulary.
These tests check the server's own behaviour: OpenAI shapes, SSE framing, reasoning / content /
tool-call separation, stop strings, limits, errors, concurrency and cancellation."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
from node_scripted import ScriptedBackend, default_script
from node_server import run_node

openai = pytest.importorskip("openai")

HARMONY_MARKS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>", "<|call|>",
                 "<|constrain|>", "analysis", "final")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_script(prompt_text: str) -> str:
    if "<|start|>functions.get_weather" in prompt_text:
        return "<|channel|>final<|message|>It is sunny in Köln.<|return|>"
    return ("<|channel|>analysis<|message|>Need the weather; call the tool.<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
            '<|message|>{"city": "Köln"}<|call|>')


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, checking the framing on the way."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


@pytest.fixture(scope="module")
def node():
    backend = ScriptedBackend()
    with run_node(backend, parallel=2) as (url, state):
        yield url, backend, state


@pytest.fixture
def client(node):
    return openai.OpenAI(base_url=f"{node[0]}/v1", api_key="unused", max_retries=0)


def test_chat_non_stream_separates_reasoning_from_content(client, node):
    r = client.chat.completions.create(model="scripted-oss", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld"}])
    msg = r.choices[0].message
    assert msg.content == "You said: héllo wörld"
    extra = msg.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "The user wrote 'héllo wörld'. Answer briefly."
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "scripted-oss"
    n_prompt = len(node[1].tokenize(node[1].last_prompt_text, special=True))
    assert r.usage.prompt_tokens == n_prompt
    scripted = node[1].tokenize(node[1].script(node[1].last_prompt_text), special=True)
    assert r.usage.completion_tokens == len(scripted)
    assert r.usage.total_tokens == n_prompt + len(scripted)
    timings = r.model_extra["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == n_prompt and timings["predicted_n"] == len(scripted)
    assert timings["predicted_per_second"] > 0


def test_chat_stream_matches_non_stream_and_ends_with_usage(client):
    messages = [{"role": "user", "content": "stream me ✓ please"}]
    whole = client.chat.completions.create(model="scripted-oss", messages=messages)
    chunks = list(client.chat.completions.create(model="scripted-oss", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    reasoning2 = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert reasoning == reasoning2 == whole.choices[0].message.model_extra["reasoning_content"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_and_done_marker(node):
    url = node[0]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert "usage" not in payloads[-1]
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop" and "timings" in payloads[-1]
    for p in payloads:
        for field in ("content", "reasoning_content", "reasoning"):
            text = p["choices"][0]["delta"].get(field) or ""
            assert not any(mark in text for mark in HARMONY_MARKS[:7]), text


def test_no_harmony_markup_in_any_text_field(client):
    r = client.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "plain"}])
    text = r.choices[0].message.content + r.choices[0].message.model_extra["reasoning_content"]
    assert not any(mark in text for mark in HARMONY_MARKS[:7])


def test_tool_calls_non_stream_and_follow_up():
    backend = ScriptedBackend(script=tool_script)
    with run_node(backend) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Weather in Köln?"}]
        r = client.chat.completions.create(model="scripted-oss", messages=messages, tools=[WEATHER_TOOL])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Köln"}
        assert choice.message.content is None
        assert backend.last_tools[0]["name"] == "get_weather"
        history = messages + [
            {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
             "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": '{"sky": "clear"}'}]
        r2 = client.chat.completions.create(model="scripted-oss", messages=history, tools=[WEATHER_TOOL])
        assert r2.choices[0].message.content == "It is sunny in Köln." and r2.choices[0].finish_reason == "stop"
        assistant = backend.last_messages[1]
        assert assistant["thinking"] == "Need the weather."
        assert assistant["tool_calls"][0]["name"] == "get_weather"
        r3 = client.chat.completions.create(model="scripted-oss", messages=messages, tools=[WEATHER_TOOL],
                                            tool_choice="none")
        assert backend.last_tools is None and r3.choices[0].finish_reason == "tool_calls"


def test_tool_calls_stream():
    with run_node(ScriptedBackend(script=tool_script)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(
            model="scripted-oss", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
            stream=True))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].id and calls[0].function.name == "get_weather"
        assert all(tc.index == 0 for tc in calls)
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Köln"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("where", ["top", "kwargs"])
def test_reasoning_effort_reaches_the_prompt(node, where):
    url, backend, _ = node
    body = {"messages": [{"role": "user", "content": "think"}]}
    if where == "top":
        body["reasoning_effort"] = "high"
    else:
        body["chat_template_kwargs"] = {"reasoning_effort": "low"}
    assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
    assert ("Reasoning: high" if where == "top" else "Reasoning: low") in backend.last_prompt_text


def test_history_reasoning_fields_accepted(node):
    url, backend, _ = node
    for field in ("reasoning_content", "reasoning", "thinking"):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", field: f"thought via {field}"},
            {"role": "user", "content": [{"type": "text", "text": "c"}]}]})
        assert r.status_code == 200, r.text
        assert backend.last_messages[1]["thinking"] == f"thought via {field}"
        assert backend.last_messages[2]["content"] == "c"


def test_stop_strings_cut_content_stream_and_not(client):
    messages = [{"role": "user", "content": "alpha beta gamma"}]
    r = client.chat.completions.create(model="scripted-oss", messages=messages, stop=["beta"])
    assert r.choices[0].message.content == "You said: alpha " and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="scripted-oss", messages=messages, stop=["a gam", "beta"],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "You said: alpha "


def test_max_tokens_gives_length(client):
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "long"}],
                                           **{key: 5})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "lp"}],
                                       logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_completions_raw_prompt_stream_echo_logprobs(node):
    url = node[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prompt = "<|start|>user<|message|>raw ü<|end|><|start|>assistant"
    r = client.completions.create(model="scripted-oss", prompt=prompt, max_tokens=200)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.startswith("<|channel|>analysis<|message|>The user wrote 'raw ü'")
    assert r.choices[0].text.endswith("You said: raw ü")
    assert r.usage.prompt_tokens == len(node[1].tokenize(prompt, special=True))
    streamed = list(client.completions.create(model="scripted-oss", prompt=prompt, max_tokens=200, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    short = client.completions.create(model="scripted-oss", prompt=prompt, max_tokens=3, echo=True, logprobs=1)
    assert short.choices[0].finish_reason == "length" and short.choices[0].text.startswith(prompt)
    lp = short.choices[0].logprobs
    n_prompt = short.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and lp.text_offset[n_prompt] == len(prompt)  # echo covers the prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.top_logprobs[-1]) == 1
    assert "".join(lp.tokens) == short.choices[0].text
    ids = node[1].tokenize("hello", special=False)
    by_ids = client.completions.create(model="scripted-oss", prompt=ids, max_tokens=2)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_models_health_tokenize_detokenize(node):
    url, backend, _ = node
    m = httpx.get(f"{url}/v1/models").json()
    assert m["data"][0]["id"] == "scripted-oss" and m["data"][0]["context_length"] == 4096
    assert m["data"][0]["meta"]["size"] == 5678 and m["ready_models"] == [1, 1] and m["initializing"] is False
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [x.id for x in client.models.list()] == ["scripted-oss"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    text = "Grüße <|start|> 🤖"
    toks = httpx.post(f"{url}/tokenize", json={"content": text}).json()["tokens"]
    assert toks == backend.tokenize(text, special=True) and 200006 in toks
    assert httpx.post(f"{url}/detokenize", json={"tokens": toks}).json()["content"] == text
    pieces = httpx.post(f"{url}/tokenize", json={"content": "ab cd", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "ab cd"


def test_request_id_echoed_or_minted(node):
    url = node[0]
    assert httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    minted = httpx.get(f"{url}/health").headers["x-request-id"]
    assert len(minted) == 32


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err) and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),  # more choices than the 2 slots
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, None),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "max"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= ("}, "grammar"),
    ({"messages": [{"role": "user", "content": "x"}], "json_schema": {"type": "wizard"}}, "json_schema"),
    ({"messages": [{"role": "user", "content": "x"}], "grammar": 'root ::= "a"', "json_schema": {}}, "json_schema"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}, None),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17}, "stop"),
])
def test_invalid_parameters_are_400(node, body, param):
    err = _error(httpx.post(f"{node[0]}/v1/chat/completions", json=body, timeout=60), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_malformed_json_and_bad_completion_prompts(node):
    url = node[0]
    assert "Malformed JSON" in _error(httpx.post(f"{url}/v1/chat/completions", content=b'{"messages": [}',
                                                 headers={"content-type": "application/json"}), 400)["message"]
    _error(httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2]"), 400)
    _error(httpx.post(f"{url}/v1/completions", json={"prompt": [5, -1]}), 400)
    for batch in (["a", "b"], [[1, 2], [3]]):  # OpenAI's batches of prompts: one per request here
        err = _error(httpx.post(f"{url}/v1/completions", json={"prompt": batch}), 400)
        assert err["param"] == "prompt" and "only one prompt per request is supported" in err["message"]
    _error(httpx.post(f"{url}/detokenize", json={"tokens": [10 ** 9]}), 400)
    _error(httpx.get(f"{url}/v1/nothing-here"), 404)


def test_prompt_over_context_is_400_exceed_context_size(node):
    url = node[0]
    long_text = "word " * 5000
    err = _error(httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}), 400)
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 4096 and err["n_prompt_tokens"] > 4096
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="scripted-oss", prompt=long_text)
    err = raised.value.body
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 4096
    assert err["n_prompt_tokens"] == len(node[1].tokenize(long_text, special=True))
    # a prompt that fills the context leaves no room to generate; one token less fits
    err = _error(httpx.post(f"{url}/v1/completions", json={"prompt": [1000] * 4096, "max_tokens": 1}), 400)
    assert (err["type"], err["n_prompt_tokens"], err["n_ctx"]) == ("exceed_context_size_error", 4096, 4096)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1000] * 4095, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 4095


def test_unknown_model_is_404_known_aliases_pass(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="llama-7b", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    for name in ("scripted-oss.gguf", "scripted:latest", "SCRIPTED-OSS"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_api_key_required_except_health():
    with run_node(ScriptedBackend(), api_key="s3cret") as (url, _):
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "x"}])
        _error(httpx.get(f"{url}/v1/models"), 401)
        assert httpx.get(f"{url}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "x"}]).choices


def test_503_while_loading_then_ready():
    release = threading.Event()

    def slow_load():
        release.wait(20)
        return ScriptedBackend()

    with run_node(slow_load, wait_ready=False) as (url, _):
        err = _error(httpx.get(f"{url}/health"), 503)
        assert err["message"] == "Loading model"
        _error(httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503)
        models = httpx.get(f"{url}/v1/models").json()
        assert models["initializing"] is True and models["ready_models"] == [0, 1]
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_queue_full_is_503_and_neighbours_unharmed():
    backend = ScriptedBackend(delay=0.01, script=lambda p: "<|channel|>final<|message|>" + "wait " * 60 + "<|return|>")
    with run_node(backend, parallel=1, max_queue=1) as (url, state):
        def long_request():
            return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "long"}]})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(long_request)
            second = pool.submit(long_request)
            while state.scheduler.n_active() + state.scheduler.queue_depth() < 2:
                time.sleep(0.005)
            err = _error(httpx.post(f"{url}/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "third"}]}), 503)
            assert err["type"] == "unavailable_error"
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert 'outcome="rejected"} 1' in httpx.get(f"{url}/metrics").text


def test_parallel_streams_interleave_and_stay_separate():
    def script(prompt_text: str) -> str:
        return default_script(prompt_text).replace("You said:", "Well, " * 40 + "you said:")

    backend = ScriptedBackend(delay=0.002, script=script)
    with run_node(backend, parallel=4) as (url, state):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        times: dict[int, list[float]] = {}

        def one(i: int) -> str:
            stamps = times.setdefault(i, [])
            out = ""
            for c in client.chat.completions.create(model="scripted-oss", stream=True,
                                                    messages=[{"role": "user", "content": f"request number {i}"}]):
                if c.choices and c.choices[0].delta.content:
                    out += c.choices[0].delta.content
                    stamps.append(time.monotonic())
            return out

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        assert results == ["Well, " * 40 + f"you said: request number {i}" for i in range(4)]
        assert max(backend.step_sizes) == 4
        first_ends = min(t[-1] for t in times.values())
        assert all(t[0] < first_ends for t in times.values())
        assert state.scheduler.n_active() == 0 and len(state.scheduler.free) == 4


def test_client_disconnect_frees_the_slot():
    backend = ScriptedBackend(delay=0.01, script=lambda p: "<|channel|>final<|message|>" + "tick " * 2000 + "<|return|>")
    with run_node(backend, parallel=1) as (url, state):
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 10:
                    break
        t0 = time.monotonic()
        while state.scheduler.n_active():
            assert time.monotonic() - t0 < 2.0, "slot not freed after the client left"
            time.sleep(0.01)
        backend.script = lambda p: "<|channel|>final<|message|>next<|return|>"
        r2 = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={"messages": [{"role": "user", "content": "y"}]})
        assert r2.json()["choices"][0]["message"]["content"] == "next"
        assert time.monotonic() - t0 < 5.0
        text = httpx.get(f"{url}/metrics").text
        assert 'pyengine_requests_total{endpoint="chat",outcome="cancelled"} 1' in text


def test_prefix_cache_reuse_is_reported():
    body = {"messages": [{"role": "user", "content": "same prompt for cache"}], "max_tokens": 2}
    with run_node(ScriptedBackend(), parallel=1) as (url, _):
        httpx.post(f"{url}/v1/chat/completions", json=body)
        second = httpx.post(f"{url}/v1/chat/completions", json=body).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == second["usage"]["prompt_tokens"] - 1
        assert second["timings"]["cache_n"] == cached and second["timings"]["prompt_n"] == 1


def test_a_conversation_returns_to_the_slot_that_holds_its_prefix():
    def chat(url: str, text: str) -> dict:
        return httpx.post(f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": text}], "max_tokens": 3}).json()

    with run_node(ScriptedBackend(delay=0.002), parallel=3) as (url, _):
        for round_ in range(2):
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda t: chat(url, t), [f"conversation {c} " * 60 for c in "abc"]))
            for a in answers:
                usage = a["usage"]
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                if round_:
                    assert cached == usage["prompt_tokens"] - 1
                else:  # a fresh slot: another conversation's cache is never evicted for the system prompt
                    assert cached == 0


def test_next_turn_after_long_reasoning_reuses_its_slot():
    def script(prompt_text: str) -> str:
        return "<|channel|>analysis<|message|>" + "hmm " * 200 + "<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"

    with run_node(ScriptedBackend(script=script), parallel=2) as (url, _):
        first = [{"role": "user", "content": "Plan a trip."}]
        r1 = httpx.post(f"{url}/v1/chat/completions", json={"messages": first}).json()
        follow = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                          {"role": "user", "content": "Shorter, please."}]
        r2 = httpx.post(f"{url}/v1/chat/completions", json={"messages": follow}).json()
        assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] >= r1["usage"]["prompt_tokens"] - 1


def test_metrics_exposition(node):
    url = node[0]
    httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "m"}]})
    text = httpx.get(f"{url}/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(lines['pyengine_requests_total{endpoint="chat",outcome="ok"}']) >= 1
    assert int(lines["pyengine_generated_tokens_total"]) > 0 and int(lines["pyengine_prompt_tokens_total"]) > 0
    assert int(lines['pyengine_time_to_first_token_seconds_bucket{le="+Inf"}']) >= 1
    assert float(lines["pyengine_time_per_output_token_seconds_count"]) > 0
    for gauge in ("pyengine_queue_depth", "pyengine_requests_processing", "pyengine_kv_cache_tokens",
                  "pyengine_kv_cache_usage_ratio", "pyengine_slots_total"):
        assert gauge in lines
    experts = {k: int(v) for k, v in lines.items() if k.startswith("pyengine_expert_selections_total")}
    assert len(experts) == 8 and sum(experts.values()) == sum(map(sum, node[1].expert_counts()))


def test_shutdown_ends_streams_with_error_chunk():
    backend = ScriptedBackend(delay=0.01, script=lambda p: "<|channel|>final<|message|>" + "tock " * 3000 + "<|return|>")
    with run_node(backend, parallel=1) as (url, state):
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            threading.Thread(target=state.shutdown).start()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][len("data: "):])["error"]
        assert err["code"] == 503 and "shutting down" in err["message"]
        _error(httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503)


def test_queued_stream_that_disconnects_leaves_the_queue():
    backend = ScriptedBackend(delay=0.01, script=lambda p: "<|channel|>final<|message|>" + "busy " * 150 + "<|return|>")
    with run_node(backend, parallel=1) as (url, state), concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "first"}]})
        while not state.scheduler.n_active():
            time.sleep(0.01)
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "queued"}], "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            time.sleep(0.2)
            assert state.scheduler.queue_depth() == 1
        t0 = time.monotonic()
        while state.scheduler.queue_depth():
            assert time.monotonic() - t0 < 2.0, "a departed client stayed queued"
            time.sleep(0.01)
        assert running.result().status_code == 200


def test_a_failing_request_does_not_harm_its_neighbour():
    backend = ScriptedBackend(delay=0.005, script=lambda p: "<|channel|>final<|message|>" + "ok " * 60 + "<|return|>")
    backend.fail_word = "boom"
    with run_node(backend, parallel=2) as (url, state):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            good = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "fine"}]})
            while not state.scheduler.n_active():
                time.sleep(0.005)
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": "boom"}], "stream": True}) as r:
                events = sse_events(r)
            assert events[-1] == "[DONE]" and "scripted failure" in json.loads(events[-2])["error"]["message"]
            bad = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "boom"}]})
            assert _error(bad, 500)["type"] == "server_error"
            assert good.result().json()["choices"][0]["message"]["content"] == "ok " * 60
        assert httpx.get(f"{url}/health").status_code == 200
