"""OpenAI's Responses API (inferlab/server/responses.py), as its Python client calls it: the answer
of chat completions as one output message, whole or as the API's typed events in order, JSON held
to a text.format schema, and what the route does not do refused in one line."""
from __future__ import annotations

import json

import httpx
import pytest
from test_server import MODEL, running_server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=64) as s:
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


def test_text_format_holds_the_answer_to_a_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input=QUESTION + " Answer in JSON.", temperature=0, max_output_tokens=30,
                                text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert json.loads(r.output_text) == {"city": "Paris"}


@pytest.mark.parametrize("extra, words", [
    ({"previous_response_id": "resp_1"}, "previous_response_id is not supported"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tools are not supported on /v1/responses yet"),
    ({"text": {"format": {"type": "xml"}}}, "text.format: type must be text, json_object or json_schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": 5}}}}, "text.format: the JSON schema cannot"),
    ({"max_output_tokens": 0}, "max_output_tokens must be an integer >= 1"),
    ({"input": []}, "input is empty"),
    ({"model": "gpt-5"}, "does not exist"),
])
def test_refusals(server, extra, words):
    r = httpx.post(f"{server.url}/v1/responses", json={"input": "hi", **extra}, timeout=30)
    assert r.status_code in (400, 404) and words in r.json()["error"]["message"], r.text
    assert not server.engine.engine.requests
