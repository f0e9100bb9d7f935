"""End to end: continuous batching in the node over the real engine.

Four concurrent greedy streams are served by four slots whose steps run in one forward pass
(Core.step -> Runner.eval over the four caches); each stream must equal its single-stream answer and an
independent greedy decode from fresh-context logits. The expert selection counters reach
/metrics and add up to the tokens the engine evaluated times the experts used per token."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time

import httpx
import pytest
from node_server import run_node
from test_node_engine import N_CTX, greedy_reference, write_model

from pyengine.core import Failed, PromptEvaluated, Request, Sampled
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend
from pyengine.sampling import SamplingParams

PROMPTS = ["<|start|>user<|message|>Tell me a story.<|end|><|start|>assistant",
           "Once upon a time",
           "<|start|>user<|message|>Zähle bis zehn, bitte, und dann noch einmal rückwärts.<|end|><|start|>assistant",
           "1, 2, 3,"]
N_TOKENS = 10


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "gpt-oss-tiny.gguf"
    write_model(path)
    return path


def test_four_streams_batched_equal_single_streams(model_path, monkeypatch):
    calls: list[list[int]] = []

    def recording(caches, tokens, logits_all=False):
        calls.append([len(t) for t in tokens])
        if len(calls) == first_concurrent:
            # Hold the scheduler's first step until all four requests have been sent, so they
            # are waiting together however slowly this machine serves HTTP.
            for _ in range(4):
                assert started.acquire(timeout=60)
            time.sleep(0.5)
        return real(caches, tokens, logits_all)

    backend = EngineBackend.load(NodeConfig(model=str(model_path), parallel=4, ctx_size=4 * N_CTX, threads=2))
    real = backend.core.runner.eval
    monkeypatch.setattr(backend.core.runner, "eval", recording)
    eog = backend.tokenizer.eog_ids
    with run_node(backend, parallel=4) as (url, _):
        def complete(prompt: str) -> str:
            started.release()
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first_concurrent, started = -1, threading.Semaphore(0)
        single = [complete(p) for p in PROMPTS]
        assert max(len(c) for c in calls) == 1
        n_single = len(calls)
        started = threading.Semaphore(0)
        first_concurrent = n_single + 1
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(complete, PROMPTS))
        assert batched == single
        assert max(len(c) for c in calls[n_single:]) == 4  # four sequences did share forward passes
        for prompt, text in zip(PROMPTS, single):
            ids = backend.tokenize(prompt, special=True)
            ref = greedy_reference(model_path, ids, N_TOKENS, eog)
            assert text == backend.tokenizer.decode([t for t in ref if t not in eog])
            assert text

        metrics = httpx.get(f"{url}/metrics").text
    per_layer: dict[int, int] = {}
    for layer, n in re.findall(r'pyengine_expert_selections_total\{layer="(\d+)",expert="\d+"\} (\d+)', metrics):
        per_layer[int(layer)] = per_layer.get(int(layer), 0) + int(n)
    hp = backend.model_file.hparams
    evaluated = sum(sum(c) for c in calls)  # every token any forward pass of the node evaluated
    assert per_layer == {layer: evaluated * hp.n_expert_used for layer in range(hp.n_layer)}


def test_a_failing_slot_ends_only_its_own_request(model_path, monkeypatch):
    """When the batched pass fails, the slots are evaluated one by one: the healthy one goes on
    exactly as if it had been alone, the failing one gets an error output."""
    backend = EngineBackend.load(NodeConfig(model=str(model_path), parallel=3, ctx_size=3 * N_CTX, threads=1))
    ids = backend.tokenize(PROMPTS[1], special=True)
    core, runner = backend.core, backend.core.runner
    alone, good, bad = (core.start(backend.new_cache(), Request(ids, SamplingParams(temperature=0))) for _ in range(3))

    def token(events):
        return next((e.id for e in events if isinstance(e, Sampled)), None)

    ref = [token(core.step([alone])[0]) for _ in range(4)]  # prompt, then 3 tokens
    real = runner.eval

    def failing(caches, tokens, logits_all=False):
        if len(caches) > 1:
            raise RuntimeError("batched pass failed")
        if caches[0] is bad.cache:
            raise MemoryError("no memory for this one")
        return real(caches, tokens, logits_all)

    monkeypatch.setattr(runner, "eval", failing)
    first = core.step([good, bad])
    assert first[0] == [PromptEvaluated(len(ids))]
    assert isinstance(first[1][0], Failed) and "no memory" in first[1][0].message and bad.done
    monkeypatch.undo()
    got = [token(core.step([good])[0]) for _ in range(3)]
    assert ref[0] is None and got == ref[1:]
