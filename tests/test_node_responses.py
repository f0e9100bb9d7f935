"""POST /v1/responses (OpenAI's Responses API) through the official openai client and raw httpx.

The model is ScriptedBackend (tests/node_scripted.py): the real generation core over a replayed
Harmony token stream, prompts rendered by openai-harmony. A Responses request runs as the chat
request it means, so each test holds the Responses answer against the chat answer to the same
conversation, or against what the script wrote: output items, stream events, usage (with
reasoning tokens), tool calls and their follow-up, stored responses, and the 400s."""

from __future__ import annotations

import json

import httpx
import pytest
from node_scripted import ScriptedBackend
from node_server import run_node
from test_node_http import client, node, tool_script  # noqa: F401 - the chat tests' node and client fixtures

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def analysis_tokens(backend: ScriptedBackend, script: str) -> int:
    """Tokens of the scripted reasoning text (between analysis's <|message|> and <|end|>)."""
    body = script.split("<|channel|>analysis<|message|>", 1)[1].split("<|end|>", 1)[0]
    return len(backend.tokenize(body))


def test_answer_matches_chat_and_usage_counts_reasoning(client, node):
    backend = node[1]
    chat = client.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "héllo ✓"}])
    r = client.responses.create(model="scripted-oss", input="héllo ✓")
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert [item.type for item in r.output] == ["reasoning", "message"]
    reasoning, message = r.output
    assert reasoning.content[0].type == "reasoning_text"
    assert reasoning.content[0].text == chat.choices[0].message.model_extra["reasoning_content"]
    assert message.role == "assistant" and message.content[0].type == "output_text"
    assert r.output_text == message.content[0].text == chat.choices[0].message.content == "You said: héllo ✓"
    n_reasoning = analysis_tokens(backend, backend.script(backend.last_prompt_text))
    assert n_reasoning > 5
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == n_reasoning
    assert chat.usage.completion_tokens_details.reasoning_tokens == n_reasoning
    assert r.incomplete_details is None and r.error is None and r.model == "scripted-oss"


def test_stream_events_build_the_non_streamed_response(client):
    whole = client.responses.create(model="scripted-oss", input="stream ✓ me")
    events = list(client.responses.create(model="scripted-oss", input="stream ✓ me", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert [i.model_dump(exclude={"id"}) for i in final.output] == [i.model_dump(exclude={"id"}) for i in whole.output]
    assert final.usage.model_dump(exclude={"input_tokens_details"}) == \
        whole.usage.model_dump(exclude={"input_tokens_details"})  # the second run reuses the cached prompt
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.item.type for e in added] == [e.item.type for e in done] == ["reasoning", "message"]
    assert [e.output_index for e in done] == [0, 1] and [e.item.id for e in done] == [i.id for i in final.output]
    for index, (delta, closing) in enumerate([("response.reasoning_text.delta", "response.reasoning_text.done"),
                                              ("response.output_text.delta", "response.output_text.done")]):
        text = "".join(e.delta for e in events if e.type == delta)
        assert text and [e.text for e in events if e.type == closing] == [text]
        assert text == final.output[index].content[0].text
        assert {e.item_id for e in events if e.type == delta} == {final.output[index].id}
    # the order of one item's events
    message = [k for k in kinds if k != "response.output_text.delta"][-6:]
    assert message == ["response.output_item.added", "response.content_part.added", "response.output_text.done",
                       "response.content_part.done", "response.output_item.done", "response.completed"]


def test_sse_framing_names_each_event(node):
    with httpx.stream("POST", f"{node[0]}/v1/responses", json={"input": "x", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    blocks = body.strip("\n").split("\n\n")
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == event[7:]
    assert "[DONE]" not in body


def test_function_call_and_its_output_follow_up():
    backend = ScriptedBackend(script=tool_script)
    with run_node(backend) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = client.responses.create(model="scripted-oss", input="Weather in Köln?", tools=[WEATHER])
        assert backend.last_tools[0]["name"] == "get_weather"
        assert [i.type for i in r.output] == ["reasoning", "function_call"]
        call = r.output[1]
        assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
        assert json.loads(call.arguments) == {"city": "Köln"}
        assert r.status == "completed" and r.output_text == ""
        follow = [{"role": "user", "content": "Weather in Köln?"}, *[i.model_dump(exclude_none=True) for i in r.output],
                  {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}]
        r2 = client.responses.create(model="scripted-oss", input=follow, tools=[WEATHER])
        assert r2.output_text == "It is sunny in Köln."
        user, assistant, tool = backend.last_messages
        assert assistant["thinking"] == r.output[0].content[0].text
        assert assistant["tool_calls"][0]["name"] == "get_weather" and assistant["tool_calls"][0]["id"] == call.call_id
        assert tool["role"] == "tool" and tool["tool_call_id"] == call.call_id and tool["content"] == '{"sky": "clear"}'
        assert tool["name"] == "get_weather"
        assert '<|start|>functions.get_weather<|channel|>commentary<|message|>{"sky": "clear"}' in backend.last_prompt_text

        # the same follow-up through previous_response_id: the stored call names the tool result
        r3 = client.responses.create(model="scripted-oss", previous_response_id=r.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}])
        assert r3.output_text == "It is sunny in Köln."
        assert [m["role"] for m in backend.last_messages] == ["user", "assistant", "tool"]
        assert backend.last_messages[2]["name"] == "get_weather"
        assert backend.last_messages[1]["thinking"] == r.output[0].content[0].text

        events = list(client.responses.create(model="scripted-oss", input="Weather?", tools=[WEATHER], stream=True))
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert json.loads(args) == json.loads(done.arguments) == {"city": "Köln"}
        assert events[-1].response.output[1].arguments == args


def test_previous_response_id_continues_and_responses_are_stored(client, node):
    backend = node[1]
    first = client.responses.create(model="scripted-oss", input="first", instructions="Be brief.")
    assert backend.last_messages[0] == {**backend.last_messages[0], "role": "developer", "content": "Be brief."}
    second = client.responses.create(model="scripted-oss", input="second", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.instructions is None
    roles = [(m["role"], m["content"]) for m in backend.last_messages]
    assert roles == [("user", "first"), ("assistant", "You said: first"), ("user", "second")]
    assert backend.last_messages[1]["thinking"] == first.output[0].content[0].text
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        client.responses.create(model="scripted-oss", input="third", previous_response_id=first.id)
    third = client.responses.create(model="scripted-oss", input="x", previous_response_id=second.id, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(third.id)


def test_settings_reach_the_prompt_and_the_answer(client, node):
    backend = node[1]
    r = client.responses.create(model="scripted-oss", input="think", reasoning={"effort": "high"}, temperature=0.5,
                                top_p=0.9, metadata={"k": "v"})
    assert "Reasoning: high" in backend.last_prompt_text
    assert r.reasoning.effort == "high" and r.temperature == 0.5 and r.top_p == 0.9 and r.metadata == {"k": "v"}
    short = client.responses.create(model="scripted-oss", input="long answer please", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3 and short.max_output_tokens == 3


def test_logprobs_match_chat(client):
    chat = client.chat.completions.create(model="scripted-oss", messages=[{"role": "user", "content": "lp"}],
                                          logprobs=True, top_logprobs=2)
    r = client.responses.create(model="scripted-oss", input="lp", include=["message.output_text.logprobs"],
                                top_logprobs=2)
    got = r.output[1].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert len(got) == len(want) > 3
    assert [(g.token, g.logprob, [t.token for t in g.top_logprobs]) for g in got] == \
        [(w.token, w.logprob, [t.token for t in w.top_logprobs]) for w in want]


def test_text_format_json_schema_reaches_the_constraint(node):
    url, backend, _ = node
    backend.script = lambda prompt: ('<|channel|>analysis<|message|>JSON.<|end|><|start|>assistant'
                                     '<|channel|>final<|message|>{"ok": 1}<|return|>')
    try:
        schema = {"type": "object", "properties": {"ok": {"type": "integer"}}, "required": ["ok"]}
        r = httpx.post(f"{url}/v1/responses", json={"input": "json", "text": {"format": {
            "type": "json_schema", "name": "answer", "schema": schema}}})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["output"][1]["content"][0]["text"]) == {"ok": 1}
        assert r.json()["text"]["format"]["schema"] == schema
        bad = httpx.post(f"{url}/v1/responses", json={"input": "json", "text": {"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text" and "nope" in bad.text
    finally:
        backend.script = ScriptedBackend().script


@pytest.mark.parametrize("body, param, words", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input", "text only"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0", "function tools only"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item references"),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input", "computer_call_output"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input", "call_id"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"role": "system", "content": "only instructions"}]}, "input", "at least one"),
    ({"input": "x", "truncation": "auto"}, None, "truncation"),
    ({"input": "x", "background": True}, None, "background"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "needs a schema"),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, None, "tool_choice"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort", "low"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than"),
])
def test_bad_requests_are_answered_with_the_field(node, body, param, words):
    r = httpx.post(f"{node[0]}/v1/responses", json=body)
    assert r.status_code == (404 if param == "previous_response_id" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_unknown_stored_ids_are_404(node):
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{node[0]}/v1/responses/resp_missing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_store_drops_the_oldest_within_its_bounds():
    from pyengine.node.responses import ResponseStore

    store = ResponseStore(count=3, max_bytes=10_000)
    for i in range(5):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
    assert [store.response(f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.put({"id": "big"}, [{"role": "user", "content": "x" * 6000}])
    store.put({"id": "big2"}, [{"role": "user", "content": "y" * 6000}])
    assert store.response("big") is None and store.messages("big2")[0]["content"] == "y" * 6000
    assert store.delete("big2") and not store.delete("big2")
