"""The published OpenAPI document, fuzzed with schemathesis against a live node on 127.0.0.1.

Every operation gets schema-driven requests (valid and invalid bodies, odd headers); the node must
never answer 5xx, and its answers must match what the document promises (status codes, content
types, JSON shapes). The model is the scripted test double (tests/node_scripted.py), so each
generation is short; derandomized Hypothesis with a bounded number of examples keeps the run
deterministic and to about two minutes on the 2-core build machine. Generation is the real core
(only the forward pass is scripted), so every fuzzed sampling parameter reaches the real
`Sampler` for every generated token: a parameter it cannot take shows up here as a 5xx."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import HealthCheck, settings
from node_scripted import ScriptedBackend
from node_server import run_node

from pyengine.node.schemas import URL_PATTERN

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import checks  # noqa: E402 - after the importorskip above

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance,
          checks.negative_data_rejection]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    backend = ScriptedBackend(delay=0.0, script=lambda prompt: SHORT_REPLY)
    slot_files = tmp_path_factory.mktemp("slots")  # fuzzed names are written and read only in here
    with run_node(backend, parallel=2, models_dir=models, slot_save_path=slot_files) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def api_schema(node):
    return schemathesis.openapi.from_url(f"{node[0]}/openapi.json")


N_VOCAB = 201088
# A fixed short reply: the fuzzed messages can be long, and the default script would echo them. Its
# answer is a JSON object, so a fuzzed response_format json_object leaves it as it is (a script
# the mask had to bend would run on to the end of the context).
SHORT_REPLY = ('<|channel|>analysis<|message|>Fine.<|end|><|start|>assistant<|channel|>final<|message|>{"ok": 1}'
               "<|return|>")

schema = schemathesis.pytest.from_fixture("api_schema")


def test_openapi_documents_every_route_and_body(node):
    doc = httpx.get(f"{node[0]}/openapi.json").json()
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ops >= {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                   ("/health", "get"), ("/metrics", "get"), ("/tokenize", "post"), ("/detokenize", "post"),
                   ("/pull", "post"), ("/chat/completions", "post"), ("/completions", "post"), ("/models", "get"),
                   ("/v1/models/{model_id}", "get"), ("/props", "get"), ("/slots", "get"),
                   ("/apply-template", "post"), ("/v1/responses", "post"), ("/responses", "post"),
                   ("/v1/responses/{response_id}", "get"), ("/v1/responses/{response_id}", "delete"),
                   ("/slots/{id_slot}", "post")}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    body = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert body["required"] == ["messages"]
    for field in ("messages", "tools", "tool_choice", "reasoning_effort", "stream", "stream_options", "stop",
                  "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias", "seed"):
        assert field in body["properties"], field
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert {"message", "type", "code"} <= set(error["required"])


@schema.parametrize()
@settings(max_examples=25, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors_and_responses_conform(case, node):
    if case.path == "/pull" and isinstance(case.body, dict) and isinstance(case.body.get("download_url"), str) \
            and re.fullmatch(URL_PATTERN, case.body["download_url"]):
        case.body["download_url"] = "http://127.0.0.1:9/model.gguf"  # a valid URL that fails at once
    case.call_and_validate(checks=CHECKS, timeout=30)


SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "seed", "stop", "max_tokens")


@pytest.fixture(scope="module")
def operations(node):
    """The published chat and completion operations, every sampling field made required and
    non-null, so each generated body sets all of them over their documented ranges."""
    doc = httpx.get(f"{node[0]}/openapi.json").json()
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        body = doc["components"]["schemas"][name]
        for field in SAMPLING:
            schema = body["properties"][field]
            branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
            body["properties"][field] = branches[0] if len(branches) == 1 else {"anyOf": branches}
        body["required"] = [*body["required"], *SAMPLING]
    schema = schemathesis.openapi.from_dict(doc)
    return {path: schema[path]["POST"] for path in ("/v1/chat/completions", "/v1/completions")}


def _documented_refusal(r: httpx.Response, body: dict) -> bool:
    """The schema-valid bodies the node may still refuse: token ids past this model's vocabulary,
    more choices (`n`) than the node has slots, an `id_slot` it does not have, and constraints it
    cannot enforce: schemas or grammars the grammar parser refuses (the document cannot spell out
    GBNF), a required or named tool call without such a tool."""
    if r.status_code != 400:
        return False
    if (body.get("n") or 1) > 2 and r.json()["error"]["param"] == "n":
        return True
    id_slot = body.get("id_slot")
    if id_slot is not None and (id_slot >= 2 or (id_slot >= 0 and (body.get("n") or 1) > 1)) \
            and r.json()["error"]["param"] == "id_slot":
        return True  # a slot this 2-slot node does not have, or a named slot for several choices
    constrained = any(body.get(k) is not None for k in ("response_format", "grammar", "json_schema")) \
        or body.get("tool_choice") not in (None, "auto", "none")
    if constrained and r.json()["error"]["param"] in ("response_format", "grammar", "json_schema", "tool_choice",
                                                       "tools"):
        return True
    ids = [int(k) for k in body.get("logit_bias") or {}]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        ids += prompt
    err = r.json()["error"]
    return max(ids, default=-1) >= N_VOCAB and err["param"] in ("logit_bias", "prompt")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_every_body_the_schema_allows_is_served(node, operations, path):
    """Positive data acceptance: what the document calls valid gets an answer, not a 4xx or 5xx,
    with every sampling parameter drawn over its whole documented range."""
    from hypothesis import given

    @given(operations[path].as_strategy())
    @settings(max_examples=40, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        body = case.body
        body.pop("model", None)  # another model's name is a documented 404
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "hi"}]  # the fuzz above covers messages
        r = httpx.post(f"{node[0]}{path}", json=body, timeout=30)
        assert r.status_code == 200 or _documented_refusal(r, body), (body, r.text)

    run()
