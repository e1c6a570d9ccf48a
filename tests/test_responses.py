"""OpenAI's Responses API (inferlab/server/responses.py), as its Python client calls it: the answer
of chat completions as one output message, whole or as the API's typed events in order, JSON held
to a text.format schema, function tools' calls as function_call items (whole and streamed), an
agent's replayed calls and their outputs read as chat completions reads them, and what the route
does not do refused in one line."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from test_server import MODEL, running_server
from test_tools import TOOLS

from inferlab.server.responses import ResponsesRequest
from inferlab.server.responses_output import Answer, events, output_items
from inferlab.server.tool_parsers import Hermes
from inferlab.server.tools import ToolPlan

QUESTION = "What is the capital of France?"
# the Responses API's function tools: chat completions' functions one level up
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=64, tool_parser="hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.url}/v1", api_key="x")


def test_an_answer_whole_and_cut_short(client, server):
    r = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=20)
    assert r.output_text == "The capital of France is Paris." and r.status == "completed"
    assert r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8
    parts = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    cut = client.responses.create(model=MODEL, input=parts, instructions="Answer in one sentence.", temperature=0,
                                  max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={"max_tokens": 1, "messages": [
        {"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": QUESTION}]}).json()
    assert cut.usage.output_tokens == 3 and cut.usage.input_tokens == chat["usage"]["prompt_tokens"]  # instructions


def test_a_stream_is_the_apis_events_in_order(client):
    events = list(client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=20,
                                          stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == events[-1].response.output_text == "The capital of France is Paris."


def test_logprobs_where_include_asks_for_them_whole_and_streamed(client, server):
    ask = dict(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=20, top_logprobs=2,
               include=["message.output_text.logprobs"])
    r = client.responses.create(**ask)
    lps = r.output[0].content[0].logprobs
    chat = httpx.post(f"{server.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 20, "logprobs": True,
        "top_logprobs": 2}, timeout=60).json()["choices"][0]["logprobs"]["content"]
    assert [(x.token, round(x.logprob, 4), [t.token for t in x.top_logprobs]) for x in lps] == [
        (x["token"], round(x["logprob"], 4), [t["token"] for t in x["top_logprobs"]]) for x in chat]
    spelt = "".join(x.token for x in lps).replace("\u0120", " ")  # (byte-level spaces; the end token is scored)
    assert spelt == r.output_text + "<|im_end|>"
    events = list(client.responses.create(**ask, stream=True))
    streamed = [x for e in events if e.type == "response.output_text.delta" for x in e.logprobs]
    assert [x.token for x in streamed] == [x.token for x in lps] == [x.token for x in events[-1].response.output[
        0].content[0].logprobs]
    assert client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=2, top_logprobs=2).output[
        0].content[0].logprobs is None  # not included: not sent


def test_text_format_holds_the_answer_to_a_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input=QUESTION + " Answer in JSON.", temperature=0, max_output_tokens=30,
                                text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert json.loads(r.output_text) == {"city": "Paris"}


@pytest.mark.parametrize("extra, words", [
    ({"previous_response_id": "resp_1"}, "previous_response_id is not supported"),
    ({"tools": [{"type": "web_search"}]}, "tools.0: 'web_search' tools are not supported"),
    ({"tools": [{"type": "function"}]}, "tools.0: Field required (name)"),
    ({"tools": FLAT, "tool_choice": {"type": "function", "name": "f"}}, "tool_choice names 'f', which is not among"),
    ({"tools": FLAT, "tool_choice": {"type": "file_search"}}, "tool_choice must be none, auto, required or"),
    ({"tools": FLAT, "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "tool_choice required and text.format both constrain the answer"),
    ({"input": [{"type": "function_call", "call_id": "c"}]}, "Field required"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input is empty"),  # (a replayed one is left out)
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0"),
    ({"text": {"format": {"type": "xml"}}}, "text.format: type must be text, json_object or json_schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": 5}}}}, "text.format: the JSON schema cannot"),
    ({"max_output_tokens": 0}, "max_output_tokens must be an integer >= 1"),
    ({"top_logprobs": 21}, "top_logprobs must be in [0, 20], got 21"),
    ({"input": []}, "input is empty"),
    ({"model": "gpt-5"}, "does not exist"),
])
def test_refusals(server, extra, words):
    r = httpx.post(f"{server.url}/v1/responses", json={"input": "hi", **extra}, timeout=30)
    assert r.status_code in (400, 404, 422) and words in r.json()["error"]["message"], r.text
    assert not server.engine.engine.requests


def test_a_named_function_is_a_function_call_item_whole_and_streamed(client):
    ask = dict(model=MODEL, input="What time is it?", tools=FLAT, temperature=0, max_output_tokens=40,
               tool_choice={"type": "function", "name": "get_time"})
    r = client.responses.create(**ask)
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_time"
    assert json.loads(call.arguments)["zone"] in ("UTC", "CET") and r.output_text == ""
    events = list(client.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    (done,) = events[-1].response.output
    assert "".join(deltas) == events[-3].arguments == done.arguments == call.arguments
    assert done.call_id == events[2].item.call_id and done.name == "get_time" and done.status == "completed"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_answers_calls_to_the_tools(client, parallel):
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=FLAT, temperature=0,
                                max_output_tokens=60, tool_choice="required", parallel_tool_calls=parallel)
    assert r.output and all(c.type == "function_call" for c in r.output) and (parallel or len(r.output) == 1)
    for c in r.output:
        assert (c.name, set(json.loads(c.arguments))) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    assert len({c.call_id for c in r.output}) == len(r.output) and r.parallel_tool_calls == parallel


def test_auto_reads_the_parsers_calls_and_streams_the_text_before_them():
    plan = ToolPlan("auto", [], None, parser=Hermes())
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    said, call = output_items(plan, text)
    assert said["content"][0]["text"] == "Sure." and (call["name"], call["arguments"]) == (
        "get_weather", '{"city": "Paris"}')
    assert [i["type"] for i in output_items(plan, "It is sunny.")] == ["message"]

    async def one_stream():  # the engine's outputs, a few characters at a time
        for end in range(4, len(text) + 4, 4):
            piece = text[end - 4:end]
            yield SimpleNamespace(error=None, finished=end >= len(text), prompt_token_ids=[1], num_cached_tokens=0,
                                  outputs=[SimpleNamespace(new_text=piece, text=text[:end], token_ids=[0],
                                                           finish_reason="stop")])

    async def sent():
        return [json.loads(e.split("data: ", 1)[1]) async for e in events(Answer("r", MODEL, {}, plan), [one_stream()])]

    got = asyncio.run(sent())
    final = got[-1]["response"]["output"]
    assert "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta").strip() == "Sure."
    assert [i["type"] for i in final] == ["message", "function_call"] and final[1]["name"] == "get_weather"
    assert final[0]["content"][0]["text"].strip() == "Sure." and got[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in got] == list(range(len(got)))


def test_an_agents_replayed_calls_and_outputs_read_as_chat_completions_reads_them(server, smol):
    call_args = '{"city": "Paris"}'
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hm."}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": call_args,
              "id": "fc_1", "status": "completed"},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}]
    chat = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": call_args}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}[{{ c.id }} " \
               "{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{{ m.tool_call_id or '' }};" \
               "{% endfor %}"
    req = ResponsesRequest(input=items)
    assert smol[1].apply_chat_template(req.messages(), chat_template=template) == \
        'user:What is the weather in Paris?;assistant:[call_1 get_weather {"city": "Paris"}];tool:Sunny, 21 Ccall_1;'
    r = httpx.post(f"{server.url}/v1/responses", json={"input": items, "tools": FLAT, "tool_choice": "none",
                                                       "max_output_tokens": 1}, timeout=60).json()
    c = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": chat, "max_tokens": 1}, timeout=60).json()
    assert r["usage"]["input_tokens"] == c["usage"]["prompt_tokens"]


def test_tools_reach_the_template_as_chat_completions_gives_them_and_auto_needs_the_servers_parser(client):
    assert ResponsesRequest(input="hi", tools=FLAT, tool_choice="required").tool_plan(None).template_tools() == TOOLS
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", max_output_tokens=8,
                                temperature=0, tools=FLAT)  # auto: the server reads Hermes' calls
    assert [i.type for i in r.output] == ["message"] and r.output_text  # this small model writes no call
    assert r.tool_choice == "auto" and [t.name for t in r.tools] == ["get_weather", "get_time"]
    with pytest.raises(ValueError, match="--enable-auto-tool-choice"):
        ResponsesRequest(input="hi", tools=FLAT).tool_plan(None)
    assert ResponsesRequest(input="hi", tools=FLAT, tool_choice="none").tool_plan(None).mode == "none"
