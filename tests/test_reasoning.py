"""Reasoning parsers (inferlab/server/reasoning.py): a thinking model's <think> ... </think> given
apart from its answer, chat's reasoning_content beside content (whole, and streamed as deltas of
each), tool calls read from the content alone, and Ollama's message.thinking; answers held to the
shape by a regex, since the embedded model does not think."""
from __future__ import annotations

import httpx
import pytest
from test_server import MODEL, running_server
from test_tools import TOOLS

from inferlab.server.reasoning import PARSERS, ReasoningStream

THOUGHT = r"<think>\nParis is in France\.\n</think>\n\nParis\."
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=128, tool_parser="hermes", reasoning_parser="qwen3") as s:
        yield s


def chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, "temperature": 0, "max_tokens": 60,
                                                              **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(server, **body) -> tuple[str, str, list]:
    from openai import OpenAI
    reasoning, content, calls = "", "", []
    for chunk in OpenAI(base_url=f"{server.url}/v1", api_key="x").chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, max_tokens=60, stream=True, extra_body=body):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
    return reasoning, content, calls


def test_qwen3s_reasoning_apart_from_its_answer_whole_and_streamed(server):
    message = chat(server, guided_regex=THOUGHT)["message"]
    assert (message["reasoning_content"], message["content"]) == ("\nParis is in France.\n", "Paris.")
    assert streamed(server, guided_regex=THOUGHT) == ("\nParis is in France.\n", "Paris.", [])
    plain = chat(server, guided_regex="Paris\\.")["message"]  # thinking off: no <think>, all content
    assert (plain["reasoning_content"], plain["content"]) == ("", "Paris.")


def test_tool_calls_are_read_from_the_content_after_the_reasoning(server):
    forced = r'<think>\nA call\.\n</think>\n\n<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}' \
             r'</tool_call>'
    choice = chat(server, tools=TOOLS, guided_regex=forced)
    assert choice["message"]["reasoning_content"] == "\nA call.\n" and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    reasoning, content, calls = streamed(server, tools=TOOLS, guided_regex=forced)
    assert reasoning == "\nA call.\n" and content == "" and calls[0].function.name == "get_weather"


def test_the_parsers_hold_back_a_tags_start():
    qwen3, r1 = PARSERS["qwen3"], PARSERS["deepseek_r1"]
    assert qwen3.split("<th", finished=False) == ("", "") and qwen3.split("<th") == ("", "<th")
    assert r1.split("hmm</thi", finished=False) == ("hmm", "") and r1.split("cut short") == ("cut short", "")
    stream, text, got = ReasoningStream(qwen3), "", []
    for piece in ["<th", "ink>\nhm", "m\n</th", "ink>\n", "\nPar", "is."]:
        text += piece
        got.append(stream.step(text, False))
    assert "".join(g[0] for g in got) == "\nhmm\n" and "".join(g[2] for g in got) == "Paris."
    assert got[0] == ("", "", "") and got[2] == ("m\n", "", "")  # "</th" held back


def test_ollamas_chat_gives_the_thinking_apart(smol):
    """DeepSeek-R1's template opens <think> in the prompt: an answer without </think> is all thinking."""
    with running_server(smol, num_kv_blocks=64, reasoning_parser="deepseek_r1") as r1:
        body = {"model": MODEL, "messages": ASK, "options": {"temperature": 0, "num_predict": 8, "repeat_penalty": 1}}
        whole = httpx.post(f"{r1.url}/api/chat", json={**body, "stream": False}, timeout=60).json()["message"]
        assert whole["content"] == "" and whole["thinking"].startswith("The capital of France")
        lines = [httpx.Response(200, content=line).json() for line in httpx.post(
            f"{r1.url}/api/chat", json=body, timeout=60).text.splitlines()]
        assert "".join(x["message"].get("thinking", "") for x in lines) == whole["thinking"]
        off = httpx.post(f"{r1.url}/api/chat", json={**body, "stream": False, "think": False}, timeout=60)
        assert off.status_code == 200  # (enable_thinking: false reaches the template)
        gen = httpx.post(f"{r1.url}/api/generate", json={"model": MODEL, "prompt": "hi", "think": True}, timeout=60)
        assert gen.status_code == 400 and "think is read on /api/chat" in gen.json()["error"]
        gen = httpx.post(f"{r1.url}/api/generate", json={"model": MODEL, "prompt": "hi", "think": False,
                                                         "stream": False, "options": {"num_predict": 2}}, timeout=60)
        assert gen.status_code == 200 and gen.json()["response"]
    with running_server(smol, num_kv_blocks=16) as plain:
        r = httpx.post(f"{plain.url}/api/chat", json={"model": MODEL, "messages": ASK, "think": True}, timeout=60)
        assert r.status_code == 400 and "--reasoning-parser" in r.json()["error"]


def test_responses_give_the_reasoning_as_an_item_before_the_answer(server):
    """The Responses API's reasoning item (reasoning_text), whole and as its typed events. text.format
    cannot hold the answer to <think>'s shape, so the parser meets it through the events' assembly of
    a plain answer (no <think>: no reasoning item) and the whole one's split of a forced one."""
    from openai import OpenAI

    from inferlab.server.responses_output import output_items
    from inferlab.server.tools import ToolPlan
    items = output_items(ToolPlan("none"), "<think>\nhmm\n</think>\n\nParis.", thinks=PARSERS["qwen3"])
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "\nhmm\n"}]
    assert items[1]["content"][0]["text"] == "Paris."
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    r = client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                max_output_tokens=20)
    assert [i.type for i in r.output] == ["message"] and r.output_text == "The capital of France is Paris."
    events = list(client.responses.create(model=MODEL, input="What is the capital of France?", temperature=0,
                                          max_output_tokens=20, stream=True))
    assert "response.reasoning_text.delta" not in [e.type for e in events]


def test_a_responses_stream_opens_the_reasoning_item_first(smol):
    """deepseek_r1: an answer cut short before </think> is all reasoning: a reasoning item streamed
    with its deltas, then the empty message."""
    from openai import OpenAI
    with running_server(smol, num_kv_blocks=64, reasoning_parser="deepseek_r1") as r1:
        client = OpenAI(base_url=f"{r1.url}/v1", api_key="x")
        ask = dict(model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=8)
        whole = client.responses.create(**ask)
        assert [i.type for i in whole.output] == ["reasoning", "message"] and whole.output_text == ""
        thought = whole.output[0].content[0].text
        events = list(client.responses.create(**ask, stream=True))
        deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
        assert "".join(deltas) == thought and thought.startswith("The capital of France")
        items = [(e.type, e.item.type) for e in events if e.type.startswith("response.output_item")]
        assert items == [("response.output_item.added", "reasoning"), ("response.output_item.done", "reasoning"),
                         ("response.output_item.added", "message"), ("response.output_item.done", "message")]
        final = events[-1].response.output
        assert final[0].content[0].text == thought and final[1].type == "message"
