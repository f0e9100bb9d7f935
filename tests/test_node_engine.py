"""End to end: the node over the real engine, tokenizer, Harmony parser and sampler.

A tiny random gpt-oss GGUF (tests/gguf_factory.py) carrying the real o200k_harmony vocabulary
(tests/vocab.py) is served with two slots (their steps batched into one forward pass); the
official openai client's greedy answers are checked against a greedy decode computed
independently, from fresh-context logits of a separate Engine (no slot, no prefix reuse, no
chunked prefill, no sampler)."""

from __future__ import annotations

import concurrent.futures

import gguf_factory
import numpy as np
import pytest
import vocab
from node_server import run_node

from pyengine import engine as engine_mod, harmony_stream
from pyengine.engine import Engine
from pyengine.errors import ContextMemoryError
from pyengine.model_file import open_model
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend
from pyengine.sampling import log_softmax

openai = pytest.importorskip("openai")
N_CTX = 256
CONTROL = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")


def write_model(path, **dims) -> None:
    """A random gpt-oss GGUF (F16 matrices, MXFP4 experts) carrying the real vocabulary."""
    gguf_factory.write_gptoss_gguf(path, arch="gpt-oss", wtype="f16", expert_type="mxfp4", tie_output=True,
                                   extra_keys=vocab.gguf_keys(), n_vocab=vocab.N_VOCAB, seed=7, **dims)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "gpt-oss-tiny.gguf"
    write_model(path)
    return path


@pytest.fixture(scope="module")
def served(model_path):
    backend = EngineBackend.load(NodeConfig(model=str(model_path), parallel=2, ctx_size=2 * N_CTX, threads=2))
    with run_node(backend, parallel=2) as (url, _):
        yield url, backend


def greedy_reference(model_path, prompt: list[int], n: int, eog: frozenset[int]) -> list[int]:
    """Greedy continuation from full fresh-context logits at every step."""
    engine = Engine(open_model(model_path), n_ctx=N_CTX, n_threads=1)
    tokens = list(prompt)
    for _ in range(n):
        nxt = int(np.argmax(engine.logits(tokens)[-1]))
        tokens.append(nxt)
        if nxt in eog:
            break
    return tokens[len(prompt):]


def test_models_endpoint_reports_the_file(served, model_path):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    (m,) = client.models.list().data
    assert m.id == "gpt-oss-tiny" and m.model_extra["context_length"] == N_CTX
    assert m.model_extra["meta"]["n_vocab"] == vocab.N_VOCAB and m.model_extra["size"] == model_path.stat().st_size


def test_greedy_completion_matches_reference_streamed_and_not(served, model_path):
    url, backend = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prompt = "<|start|>user<|message|>Say something about Köln.<|end|><|start|>assistant"
    ids = backend.tokenize(prompt, special=True)
    ref = greedy_reference(model_path, ids, 12, backend.tokenizer.eog_ids)
    ref_text = backend.tokenizer.decode([t for t in ref if t not in backend.tokenizer.eog_ids])
    r = client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref_text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    streamed = list(client.completions.create(model="gpt-oss-tiny", prompt=ids, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref_text
    assert streamed[-1].usage.completion_tokens == len(ref)
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_batch_size_flag_chunks_prompts_and_keeps_the_answer(model_path):
    """-b / --batch-size: a slot reads a prompt n_batch tokens per step; the answer is unchanged."""
    backend = EngineBackend.load(NodeConfig(model=str(model_path), parallel=1, ctx_size=N_CTX, threads=2, n_batch=16,
                                            ctx_checkpoints=3, checkpoint_min_step=64))
    assert backend.engine.n_batch == 16 and backend.engine.runner.n_checkpoints == 3  # --ctx-checkpoints too
    assert backend.engine.runner.checkpoint_min_step == 64  # and --checkpoint-min-step
    steps = []
    real_step = backend.core.step
    backend.core.step = lambda seqs: steps.append(len(seqs[0].pending)) or real_step(seqs)
    with run_node(backend, parallel=1) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        prompt = "<|start|>user<|message|>" + "Tell me about the bridges of Köln, one by one. " * 5 + \
            "<|end|><|start|>assistant"
        ids = backend.tokenize(prompt, special=True)
        r = client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=6, temperature=0)
    ref = greedy_reference(model_path, ids, 6, backend.tokenizer.eog_ids)
    assert r.choices[0].text == backend.tokenizer.decode([t for t in ref if t not in backend.tokenizer.eog_ids])
    assert len(ids) > 4 * 16 and sum(1 for p in steps if p > 0) >= len(ids) // 16  # 16 prompt tokens a step


def test_greedy_chat_two_slots_at_once(served, model_path):
    url, backend = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    questions = ["What is 2+2?", "Name a colour, please."]

    def chat(q: str, stream: bool):
        kwargs = {"model": "gpt-oss-tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 10,
                  "temperature": 0, "reasoning_effort": "low"}
        if not stream:
            r = client.chat.completions.create(**kwargs)
            m = r.choices[0].message
            return m.content or "", m.model_extra.get("reasoning_content") or "", r.usage.completion_tokens
        text = reasoning = ""
        usage = None
        for c in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            if c.choices:
                text += c.choices[0].delta.content or ""
                reasoning += (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
            usage = c.usage or usage
        return text, reasoning, usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: chat(*a), [(q, s) for q in questions for s in (False, True)]))
    for i, q in enumerate(questions):
        whole, streamed = results[2 * i], results[2 * i + 1]
        assert whole == streamed
        prompt = backend.render_chat([{"role": "user", "content": q, "thinking": None, "tool_calls": None,
                                       "tool_call_id": None, "name": None}], None, "low")
        assert "Reasoning: low" in backend.detokenize(prompt)
        ref = greedy_reference(model_path, prompt, 10, backend.tokenizer.eog_ids)
        expected = harmony_stream.parse(ref, backend.tokenizer)
        assert whole[0] == (expected["content"] or "") and whole[1] == (expected["reasoning_content"] or "")
        assert whole[2] == len(ref) and whole[0]
        for text in whole[:2]:
            assert not any(mark in text for mark in CONTROL)


def test_greedy_response_matches_reference(served, model_path):
    """/v1/responses on the real engine: the instructions, the earlier turns of a function call and
    its output reach the prompt through the real renderer, and the items hold the greedy reference."""
    url, backend = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "name": "lookup", "description": "Look a word up",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}
    items = [{"role": "user", "content": "Define Dom."},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Look."}]},
             {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"word": "Dom"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "a cathedral"}]
    r = client.responses.create(model="gpt-oss-tiny", input=items, instructions="Be brief.", tools=[tool],
                                max_output_tokens=10, temperature=0, reasoning={"effort": "low"})
    chat = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Define Dom."},
            {"role": "assistant", "content": None, "thinking": "Look.", "tool_calls": [
                {"id": "call_1", "name": "lookup", "arguments": '{"word": "Dom"}'}]},
            {"role": "tool", "content": "a cathedral", "tool_call_id": "call_1", "name": None}]
    prompt = backend.render_chat(chat, [{k: v for k, v in tool.items() if k != "type"}], "low")
    text = backend.detokenize(prompt)
    assert "Be brief." in text and "<|start|>functions.lookup to=assistant" in text and "a cathedral" in text
    assert "<|channel|>analysis<|message|>Look.<|end|>" in text  # reasoning passed back before a tool call stays
    ref = greedy_reference(model_path, prompt, 10, backend.tokenizer.eog_ids)
    expected = harmony_stream.parse(ref, backend.tokenizer)
    got = {i.type: i for i in r.output}
    assert expected["content"] or expected["reasoning_content"]
    assert (got["message"].content[0].text if "message" in got else None) == expected["content"]
    assert (got["reasoning"].content[0].text if "reasoning" in got else None) == expected["reasoning_content"]
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == len(ref)
    assert r.status == ("incomplete" if len(ref) == 10 and ref[-1] not in backend.tokenizer.eog_ids else "completed")


@pytest.mark.parametrize("cache_ram", [64, 0])
def test_prompt_cache_brings_back_a_conversation_another_took_the_slot_from(model_path, cache_ram):
    """One slot, two conversations: A, then B (which takes A's slot), then A's next turn. With
    --cache-ram, A's first turn comes back from host memory (its prompt counts as cached) and the
    answer is still the independent greedy decode; without it, A's turn is evaluated again."""
    import httpx

    backend = EngineBackend.load(NodeConfig(model=str(model_path), parallel=1, ctx_size=4 * N_CTX, threads=2))
    with run_node(backend, parallel=1, cache_ram_mib=cache_ram) as (url, state):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

        def ask(messages):
            r = client.chat.completions.create(model="gpt-oss-tiny", messages=messages, max_tokens=6, temperature=0,
                                               reasoning_effort="low")
            return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

        def render(messages):
            return backend.render_chat([{"role": m["role"], "content": m["content"], "thinking": None,
                                         "tool_calls": None, "tool_call_id": None, "name": None} for m in messages],
                                       None, "low")

        a = [{"role": "user", "content": "Tell me about the cathedral of Köln and its two towers, " * 10}]
        b = [{"role": "user", "content": "Something else: the rivers of Bavaria, one by one, " * 10}]
        answer, _ = ask(a)
        ask(b)
        a2 = a + [{"role": "assistant", "content": answer or "ok"}, {"role": "user", "content": "And the bells?"}]
        answer2, cached = ask(a2)
        a_prompt, b_prompt = render(a), render(b)
        shared = next(i for i, (x, y) in enumerate(zip(a_prompt, b_prompt)) if x != y)  # the system message
        metrics = httpx.get(f"{url}/metrics").text
        if cache_ram:
            assert cached >= len(a_prompt) - 2  # the first turn's prompt, back from host memory
            assert "pyengine_prompt_cache_restores 1" in metrics and state.scheduler.prompt_cache.restored == 1
        else:
            assert cached <= shared < len(a_prompt) // 2  # only the system message was still in the slot
            assert state.scheduler.prompt_cache is None and "prompt_cache" not in metrics
        prompt = render(a2)
        ref = greedy_reference(model_path, prompt, 6, backend.tokenizer.eog_ids)
        expected = harmony_stream.parse(ref, backend.tokenizer)
        assert answer2 == expected["content"] and answer2
        # the slot's rows (restored ones included) give the logprobs a fresh context gives
        r = client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=1)
        fresh = Engine(open_model(model_path), n_ctx=4 * N_CTX, n_threads=1)
        tokens = prompt + backend.tokenize("".join(r.choices[0].logprobs.tokens), special=True)
        rows = fresh.logits(tokens)[len(prompt) - 1:-1]
        want = [float(log_softmax(row)[t]) for row, t in zip(rows, tokens[len(prompt):])]
        np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, want, atol=2e-3)


def test_slot_files_carry_a_conversation_to_a_restarted_node_and_to_the_library(model_path, tmp_path):
    """A slot saved to a file (POST /slots/0?action=save) by one node is restored into another
    node's slot: the next turn reuses the first turn's prompt and still answers the independent
    greedy decode; the library's Engine.load_state reads the same file and continues it too."""
    import httpx

    from pyengine import EngineState

    def load():
        return EngineBackend.load(NodeConfig(model=str(model_path), parallel=2, ctx_size=4 * N_CTX, threads=2))

    def ask(url, messages):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="gpt-oss-tiny", messages=messages, max_tokens=6, temperature=0,
                                           reasoning_effort="low")
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    first = [{"role": "user", "content": "Tell me about the cathedral of Köln and its two towers, " * 10}]
    with run_node(load(), parallel=2, slot_save_path=tmp_path, cache_ram_mib=0) as (url, _):
        answer, _ = ask(url, first)
        slot = next(s["id"] for s in httpx.get(f"{url}/slots").json() if s["n_prompt_tokens_cached"])
        saved = httpx.post(f"{url}/slots/{slot}?action=save", json={"filename": "koeln.slot"}).json()
    backend = load()
    nxt = first + [{"role": "assistant", "content": answer or "ok"}, {"role": "user", "content": "And the bells?"}]
    prompt = backend.render_chat([{"role": m["role"], "content": m["content"], "thinking": None, "tool_calls": None,
                                   "tool_call_id": None, "name": None} for m in nxt], None, "low")
    first_prompt = backend.render_chat([{"role": "user", "content": first[0]["content"], "thinking": None,
                                         "tool_calls": None, "tool_call_id": None, "name": None}], None, "low")
    ref = greedy_reference(model_path, prompt, 6, backend.tokenizer.eog_ids)
    with run_node(backend, parallel=2, slot_save_path=tmp_path, cache_ram_mib=0) as (url, _):
        restored = httpx.post(f"{url}/slots/1?action=restore", json={"filename": "koeln.slot"}).json()
        assert restored["n_restored"] == saved["n_saved"] >= len(first_prompt)
        answer2, cached = ask(url, nxt)
    assert cached >= len(first_prompt) - 2  # the first turn was not evaluated again
    assert answer2 == harmony_stream.parse(ref, backend.tokenizer)["content"] and answer2

    eng = Engine(open_model(model_path), n_ctx=N_CTX, n_threads=1)
    eng.load_state(EngineState.load(tmp_path / "koeln.slot"))
    shared = min(len(first_prompt) - 2, eng.n_past)
    eng.truncate(shared)
    out = [e.id for e in eng.generate(prompt, max_tokens=6, temperature=0, stop_token_ids=())]
    assert eng.n_prompt_reused == shared and out[:len(ref)] == ref and out


def test_cli_serves_a_model_by_name_from_the_models_folder(model_path, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys

    import httpx
    from node_server import free_port, wait_ready

    models = tmp_path / "models"
    (models / "gpt-oss_tiny").mkdir(parents=True)
    shutil.copy(model_path, models / "gpt-oss_tiny" / "model.gguf")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyengine.cli", "serve", "--model", "gpt-oss:tiny",
                             "--models-dir", str(models), "--port", str(port), "--ctx-size", "128",
                             "--threads", "1", "--verbose"],
                            cwd=tmp_path, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, timeout=60)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "gpt-oss:tiny"
        for name in ("gpt-oss:tiny", "gpt-oss-tiny", "gpt-oss_tiny"):
            r = httpx.post(f"{url}/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).json()
            assert r["usage"]["completion_tokens"] == 4 and r["model"] == "gpt-oss:tiny"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        for line in ("[INFO] Loading model: ", "[INFO] Architecture detected: ", "[INFO] Model loaded successfully",
                     "prompt eval time = "):
            assert line in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_default_context_is_shared_between_slots(model_path):
    one = EngineBackend.load(NodeConfig(model=str(model_path), parallel=1, threads=1))
    four = EngineBackend.load(NodeConfig(model=str(model_path), parallel=4, threads=1))
    assert four.info.n_ctx == max(512, one.info.n_ctx // 4)
    assert {four.new_cache().n_ctx for _ in range(4)} == {four.info.n_ctx}


def test_every_slots_cache_must_fit_in_memory(model_path, monkeypatch):
    # memory for 3 caches of 1024 positions (with the 8 checkpoint copies of their rings each):
    # -c 2048 -np 2 loads, -c 4096 -np 4 is refused up front
    per_pos, rings = Engine(open_model(model_path), n_ctx=64, n_threads=1)._model.kv_bytes_per_token(512, "f16", "f16")
    monkeypatch.setattr(engine_mod, "available_memory", lambda: 3 * (1024 * per_pos + 9 * rings))
    assert EngineBackend.load(NodeConfig(model=str(model_path), parallel=2, ctx_size=2048, threads=1)).info.n_ctx == 1024
    with pytest.raises(ContextMemoryError, match=r"^4 KV caches of n_ctx=1024 need .* GiB of KV cache and"):
        EngineBackend.load(NodeConfig(model=str(model_path), parallel=4, ctx_size=4096, threads=1))


def test_library_and_node_give_the_same_tokens_for_the_same_request(served, model_path):
    """One core, one place for defaults: the same explicit sampling parameters and seed give the
    same reply through Engine and through the node, chat and text completion alike."""
    url, backend = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    eng = Engine(open_model(model_path), n_ctx=N_CTX, n_threads=1)
    sampling = dict(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, presence_penalty=0.3,
                    frequency_penalty=0.2, logprobs=True, top_logprobs=2)
    messages = [{"role": "user", "content": "Name three colours."}]
    lib = eng.create_chat_completion(messages, top_k=0, min_p=0.0, reasoning_effort="medium", **sampling)
    node = client.chat.completions.create(model="gpt-oss-tiny", messages=messages, **sampling,
                                          extra_body={"top_k": 0, "min_p": 0.0}).model_dump()
    for got in (lib, node):
        assert got["usage"]["completion_tokens"] == lib["usage"]["completion_tokens"]
        assert got["choices"][0]["finish_reason"] == lib["choices"][0]["finish_reason"]
    a, b = lib["choices"][0], node["choices"][0]
    assert a["message"]["content"] == b["message"]["content"]
    assert a["message"]["reasoning_content"] == b["message"]["reasoning_content"]
    assert [e["token"] for e in a["logprobs"]["content"]] == [e["token"] for e in b["logprobs"]["content"]]
    np.testing.assert_allclose([e["logprob"] for e in a["logprobs"]["content"]],
                               [e["logprob"] for e in b["logprobs"]["content"]], rtol=1e-5, atol=1e-5)

    prompt = "Once upon a time"
    kw = dict(temperature=0.7, top_p=0.9, max_tokens=12, seed=99)
    lib = eng.create_completion(prompt, top_k=0, min_p=0.0, **kw)
    node = client.completions.create(model="gpt-oss-tiny", prompt=prompt, **kw, extra_body={"top_k": 0, "min_p": 0.0})
    assert node.choices[0].text == lib["choices"][0]["text"]
    assert node.usage.completion_tokens == lib["usage"]["completion_tokens"]


def test_echo_logprobs_cover_the_prompt_tokens(served, model_path):
    """echo + logprobs: one entry per prompt token too, each the model's logprob of that token
    after the ones before it (the first has none), as the library gives them."""
    url, backend = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt = "The quick brown fox jumps"
    ids = backend.tokenize(prompt, special=True)
    r = client.completions.create(model="gpt-oss-tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and r.choices[0].text.startswith(prompt)
    ref = Engine(open_model(model_path), n_ctx=N_CTX, n_threads=1).logits(ids)
    expected = [None] + [float(log_softmax(ref[i - 1])[ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], expected[1:], rtol=1e-4, atol=1e-4)
    lib = Engine(open_model(model_path), n_ctx=N_CTX, n_threads=1).create_completion(
        prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)["choices"][0]["logprobs"]
    assert lib["tokens"] == lp.tokens and lib["text_offset"] == lp.text_offset
    np.testing.assert_allclose(lib["token_logprobs"][1:], lp.token_logprobs[1:], rtol=1e-5, atol=1e-5)
