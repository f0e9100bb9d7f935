"""Constrained decoding (pyengine.constrain) on the random-weight demo model.

The demo model writes nonsense, so only the mask can make its replies valid: every reply is
checked against its JSON schema with `jsonschema` (nested objects, enums, arrays with minItems,
anyOf) or against its grammar with `re`, through the Python API and through the node with the
official openai client. A scripted model shows that the reasoning is not masked and that an answer
that already conforms passes unchanged. Invalid schemas and grammars are refused with the parser's
message. Random models are steered away from the reasoning channel with logit_bias (the mask then
leaves only the answer or a call), except where reasoning is the point."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from node_server import run_node
from scripted_model import script_engine

from pyengine import Engine
from pyengine.demo_model import write_demo_model
from pyengine.node.config import NodeConfig
from pyengine.node.engine_backend import EngineBackend
from pyengine.sampling import Sampler, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

N_CTX = 1024
LIMIT = 400  # tokens per reply: the bounded schemas below finish well within it

PERSON = {
    "type": "object",
    "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130}},
            "required": ["name", "age"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4},
        "contact": {"anyOf": [
            {"type": "object", "properties": {"email": {"type": "string", "maxLength": 20}},
             "required": ["email"], "additionalProperties": False},
            {"type": "object", "properties": {"phone": {"type": "integer", "minimum": 0, "maximum": 999999}},
             "required": ["phone"], "additionalProperties": False}]},
    },
    "required": ["user", "role", "tags", "contact"], "additionalProperties": False}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {
                "sku": {"enum": ["A-1", "B-2", "C-3"]},
                "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                "gift": {"type": "boolean"}},
            "required": ["sku", "qty", "gift"], "additionalProperties": False}},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 10}]},
    },
    "required": ["items", "note"], "additionalProperties": False}
LIST = {"type": "array", "items": {"enum": [1, 2, 3, "x"]}, "minItems": 3, "maxItems": 5}
SCHEMAS = {"person": PERSON, "order": ORDER, "list": LIST}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}]
COLORS = 'root ::= color ("," color)*\ncolor ::= "red" | "green" | "blue"'
COLORS_RE = r"(red|green|blue)(,(red|green|blue))*"
CHAT = [{"role": "user", "content": "Describe someone as JSON."}]


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("constrain") / "demo.gguf")


@pytest.fixture(scope="module")
def eng(demo_path):
    return Engine(demo_path, n_ctx=N_CTX, n_threads=2)


@pytest.fixture(scope="module")
def no_reasoning(eng):
    """logit_bias that keeps a random model out of the reasoning channel."""
    (analysis,) = eng.tokenize("analysis")
    return {analysis: -100}


@pytest.fixture(scope="module")
def served(demo_path):
    backend = EngineBackend.load(NodeConfig(model=str(demo_path), ctx_size=N_CTX, threads=2))
    with run_node(backend) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), url, backend


def test_sampler_mask_draws_only_allowed_tokens():
    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.standard_normal(500).astype(np.float32) * 3
        mask = rng.random(500) < rng.uniform(0.002, 0.5)
        mask[rng.integers(500)] = True
        params = SamplingParams(temperature=float(rng.uniform(0.3, 1.5)), seed=trial,
                                top_k=int(rng.integers(0, 50)), top_p=float(rng.uniform(0.5, 1.0)))
        ids, probs = Sampler(params).candidates(logits, mask=mask)
        ref_ids, ref_probs = Sampler(params).candidates(np.where(mask, logits, -np.inf))
        np.testing.assert_array_equal(np.sort(ids), np.sort(ref_ids))
        assert mask[ids].all()
        s = Sampler(params)
        assert all(mask[s.sample(logits, mask=mask)] for _ in range(50))
        greedy = Sampler(SamplingParams(temperature=0.0)).sample(logits, mask=mask)
        assert greedy == int(np.flatnonzero(mask)[np.argmax(logits[mask])])
    # a bias that bans every allowed token still draws an allowed one
    mask = np.zeros(10, dtype=bool)
    mask[7] = True
    logits = np.full(10, np.nan)
    assert Sampler(SamplingParams(seed=1)).sample(logits, mask=mask) == 7


def test_constraint_walks_harmony_headers(eng):
    """The mask state machine on its own: headers held to the allowed spellings, reasoning free
    (also when it starts a new header without <|end|>), the answer held to the grammar and
    <|return|> allowed only where the grammar accepts."""
    from pyengine.constrain import Constraint, request_spec

    tok = eng.tokenizer
    sp = tok.special_tokens
    enc = lambda text: tok.encode(text, special=True)  # noqa: E731
    spec = request_spec(tok, response_format=response_format(LIST), tools=TOOLS)
    c = Constraint(spec, tok, tok.n_vocab, chat=True, eog=tok.eog_ids)
    assert np.flatnonzero(c.allowed()).tolist() == [sp["<|channel|>"]]
    for t in enc("<|channel|>analysis<|message|>"):
        assert c.allowed()[t]
        c.advance(t)
    rng = np.random.default_rng(0)
    for t in [*enc('not {json] "at all'), *rng.integers(0, 199998, 20).tolist()]:
        assert c.allowed() is None
        c.advance(int(t))
    c.advance(sp["<|channel|>"])  # a new header straight from the reasoning
    after_channel = c.allowed()
    firsts = {enc(w)[0] for w in ("analysis", "final", "commentary")}
    assert set(np.flatnonzero(after_channel)) == firsts
    for t in enc("final<|message|>"):
        assert c.allowed()[t]
        c.advance(t)
    for t in enc('[1, "x", 3'):
        allowed = c.allowed()
        assert allowed[t] and not allowed[sp["<|return|>"]] and not allowed[sp["<|end|>"]]
        c.advance(t)
    assert c.allowed()[enc("]")[0]]
    c.advance(enc("]")[0])
    assert np.flatnonzero(c.allowed()).tolist() == [sp["<|return|>"]]
    c.advance(sp["<|return|>"])
    assert c.allowed() is None
    # a required call: no final channel among the headers, only the tools'
    c = Constraint(request_spec(tok, tools=TOOLS, tool_choice="required"), tok, tok.n_vocab, True, tok.eog_ids)
    c.advance(sp["<|channel|>"])
    assert set(np.flatnonzero(c.allowed())) == {enc("analysis")[0], enc("commentary")[0]}


def _check_chat(reply: dict, schema: dict) -> None:
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_api_chat_json_schema(eng, no_reasoning, name):
    schema = SCHEMAS[name]
    for seed in range(2):
        reply = eng.create_chat_completion(CHAT, response_format=response_format(schema), seed=seed,
                                           temperature=1.0, max_tokens=LIMIT, logit_bias=no_reasoning)
        _check_chat(reply, schema)
    chunks = list(eng.create_chat_completion(CHAT, response_format=response_format(schema), seed=5, stream=True,
                                             max_tokens=LIMIT, logit_bias=no_reasoning))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_api_reasoning_comes_first(eng):
    """With reasoning allowed (kept short by a bias on <|end|>), a reply may reason first, then
    answer in the schema."""
    end = eng.tokenizer.special_tokens["<|end|>"]
    for seed in range(8):  # the random model picks the reasoning channel for some seeds
        reply = eng.create_chat_completion(CHAT, response_format=response_format(LIST), seed=seed, temperature=1.0,
                                           top_k=0, top_p=1.0, min_p=0.0, max_tokens=LIMIT, logit_bias={end: 8})
        _check_chat(reply, LIST)
        if reply["choices"][0]["message"]["reasoning_content"]:
            break
    else:
        pytest.fail("no reply reasoned")


@pytest.mark.parametrize("choice", ["required", "get_weather", "get_time"])
def test_api_tool_choice_is_enforced(eng, no_reasoning, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        reply = eng.create_chat_completion([{"role": "user", "content": "What now?"}], tools=TOOLS,
                                           tool_choice=tool_choice, seed=seed, max_tokens=LIMIT,
                                           logit_bias=no_reasoning)
        choice_ = reply["choices"][0]
        assert choice_["finish_reason"] == "tool_calls", choice_
        (call,) = choice_["message"]["tool_calls"]
        name = call["function"]["name"]
        assert name in params and (choice == "required" or name == choice)
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])


def test_api_completion_grammar_and_schema(eng):
    llama_cpp = pytest.importorskip("llama_cpp")
    grammars = [COLORS, llama_cpp.LlamaGrammar.from_string(COLORS, verbose=False)]  # llama-cpp-python's object too
    for seed in range(2):
        out = eng.create_completion("Colors:", grammar=grammars[seed], seed=seed, max_tokens=200, temperature=1.0)
        assert out["choices"][0]["finish_reason"] == "stop"
        assert re.fullmatch(COLORS_RE, out["choices"][0]["text"]), out["choices"][0]["text"]
        out = eng.create_completion("JSON:", response_format=response_format(ORDER), seed=seed, max_tokens=LIMIT)
        assert out["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out["choices"][0]["text"]), ORDER)


@pytest.mark.parametrize("kwargs, words", [
    ({"response_format": response_format({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})}, "nope"),
    ({"response_format": response_format({"type": "wizard"})}, "wizard"),
    ({"response_format": {"type": "xml"}}, "xml"),
    ({"grammar": 'root ::= "a" ('}, "Expected ')'"),
    ({"grammar": "root ::= missing"}, "missing"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"grammar": COLORS, "response_format": {"type": "json_object"}}, "only one of"),
])
def test_api_invalid_constraints_raise(eng, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        eng.create_chat_completion(CHAT, max_tokens=4, **kwargs)


def test_reasoning_is_not_masked(demo_path):
    """A scripted model reasons in text that breaks the schema, then answers: the reasoning comes
    out exactly as written; a conforming answer passes unchanged (json_object too), a
    non-conforming one is forced into the schema."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    reasoning = 'Not JSON at all: {"ok": maybe]] <- broken'
    eng = Engine(demo_path, n_ctx=N_CTX, n_threads=1)
    for answer in ('{"ok": true}', "Sure, here it is!"):
        script_engine(eng, lambda _prompt, a=answer: f"<|channel|>analysis<|message|>{reasoning}<|end|>"
                      f"<|start|>assistant<|channel|>final<|message|>{a}<|return|>")
        for temperature in (0.0, 1.0):
            reply = eng.create_chat_completion(CHAT, response_format=response_format(schema), seed=3,
                                               temperature=temperature, max_tokens=100)
            message = reply["choices"][0]["message"]
            assert message["reasoning_content"] == reasoning
            jsonschema.validate(json.loads(message["content"]), schema)
            if answer.startswith("{"):
                assert message["content"] == answer
                reply = eng.create_chat_completion(CHAT, response_format={"type": "json_object"}, seed=3,
                                                   temperature=temperature, max_tokens=100)
                assert reply["choices"][0]["message"]["content"] == answer


# --- the node, through the openai client -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_node_chat_json_schema(served, no_reasoning, name):
    client = served[0]
    schema = SCHEMAS[name]
    bias = {str(k): v for k, v in no_reasoning.items()}
    for seed in range(2):
        reply = client.chat.completions.create(model="demo", messages=CHAT, response_format=response_format(schema),
                                               seed=seed, max_tokens=LIMIT, logit_bias=bias)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    stream = client.chat.completions.create(model="demo", messages=CHAT, response_format=response_format(schema),
                                            seed=7, max_tokens=LIMIT, logit_bias=bias, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_node_llama_server_fields_and_tools(served, no_reasoning):
    client = served[0]
    bias = {str(k): v for k, v in no_reasoning.items()}
    for seed in range(2):
        out = client.completions.create(model="demo", prompt="Colors:", max_tokens=200, seed=seed,
                                        extra_body={"grammar": COLORS})
        assert re.fullmatch(COLORS_RE, out.choices[0].text)
        out = client.completions.create(model="demo", prompt="JSON:", max_tokens=LIMIT, seed=seed,
                                        extra_body={"json_schema": PERSON})
        jsonschema.validate(json.loads(out.choices[0].text), PERSON)
        reply = client.chat.completions.create(model="demo", messages=CHAT, seed=seed, max_tokens=LIMIT,
                                               logit_bias=bias, extra_body={"json_schema": LIST})
        jsonschema.validate(json.loads(reply.choices[0].message.content), LIST)
        reply = client.chat.completions.create(
            model="demo", messages=CHAT, seed=seed, max_tokens=LIMIT, logit_bias=bias, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


def test_node_invalid_constraints_are_400(served):
    client = served[0]
    cases = [({"response_format": response_format({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})},
              "nope"),
             ({"extra_body": {"grammar": "root ::= missing"}}, "missing"),
             ({"extra_body": {"json_schema": {"type": "wizard"}}}, "wizard"),
             ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope")]
    for kwargs, words in cases:
        with pytest.raises(openai.BadRequestError, match=re.escape(words)):
            client.chat.completions.create(model="demo", messages=CHAT, max_tokens=4, **kwargs)
    with pytest.raises(openai.BadRequestError, match="missing"):
        client.completions.create(model="demo", prompt="x", max_tokens=4, extra_body={"grammar": "root ::= missing"})
