"""Tool calling (inferlab/server/tools.py): a named function's arguments and "required"'s calls are
held to the tools' schemas, streamed or whole; "auto" reads Hermes-format calls out of the answer
where the server was started for it, and text before them streams as it comes; the tools reach the
chat template as vLLM gives them; and each misuse is a 400 that says what to send."""
from __future__ import annotations

import json

import httpx
import pytest
from test_server import MODEL, running_server

from inferlab.server.protocol import ChatCompletionRequest
from inferlab.server.tool_parsers import Hermes, Llama3Json, Mistral, Pythonic, Qwen3Coder
from inferlab.server.tools import Tool, ToolPlan, ToolStream

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
           "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "A city's weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# an answer held to Hermes' format, so that "auto" has a call to read from this small model
HERMES = r'Sure\. <tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=256, tool_parser="hermes") as s:
        yield s


def chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, "tools": TOOLS, "temperature": 0,
                                                              "max_tokens": 60, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(server, **body) -> tuple[str, list[dict], str]:
    """(content, tool calls with their argument pieces joined, finish reason) of a streamed choice."""
    from openai import OpenAI
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
                                                stream=True, **body):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            whole = calls.setdefault(c.index, {"name": "", "arguments": ""})
            whole["name"] += (c.function.name or "") if c.id else ""
            whole["arguments"] += c.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def test_a_named_function_answers_its_arguments(server):
    choice = chat(server, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
    assert call["function"]["name"] == "get_time" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")
    content, calls, reason = streamed(server, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert content == "" and calls == [{"name": "get_time", "arguments": call["function"]["arguments"]}]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_answers_calls_to_the_tools(server, parallel):
    choice = chat(server, tool_choice="required", parallel_tool_calls=parallel)
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and calls and (parallel or len(calls) == 1)
    for c in calls:
        args = json.loads(c["function"]["arguments"])
        assert (c["function"]["name"], set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    _, got, reason = streamed(server, tool_choice="required", parallel_tool_calls=parallel)
    assert reason == "tool_calls" and got == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                              for c in calls]


def test_auto_reads_hermes_calls_and_streams_the_text_before_them(server):
    choice = chat(server, guided_regex=HERMES)
    assert choice["message"]["content"] == "Sure." and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    content, calls, reason = streamed(server, extra_body={"guided_regex": HERMES})
    assert content.strip() == "Sure." and calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert reason == "tool_calls"
    plain = chat(server, guided_regex="It is sunny in Paris <tool_c")  # a call's start that never comes: text
    assert plain["message"] == {"role": "assistant", "content": "It is sunny in Paris <tool_c"}
    content, calls, _ = streamed(server, extra_body={"guided_regex": "It is sunny in Paris <tool_c"})
    assert content == "It is sunny in Paris <tool_c" and calls == []


def test_none_leaves_the_tools_out_of_the_prompt(server):
    r = [httpx.post(f"{server.url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, **body},
                    timeout=60).json() for body in ({}, {"tools": TOOLS, "tool_choice": "none"})]
    assert r[0]["usage"]["prompt_tokens"] == r[1]["usage"]["prompt_tokens"]


def test_the_tools_reach_the_template_as_vllm_gives_them(smol):
    template = "{% for t in tools %}{{ t.type }}:{{ t.function.name }}({{ t.function.parameters | tojson }});" \
               "{% endfor %}{{ messages[0].content }}"
    plan = ToolPlan.of(ChatCompletionRequest(messages=ASK, tools=TOOLS).tools, "required", None)
    text = smol[1].apply_chat_template(ASK, template_kwargs={"tools": plan.template_tools()}, chat_template=template)
    assert text == f"function:get_weather({json.dumps(WEATHER)});function:get_time({json.dumps(TIME)});" + \
        ASK[0]["content"]


def test_the_hermes_parser_and_a_streams_held_back_text():
    content, calls = Hermes().parse('Let me check. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
                                    '<tool_call>{"name": "b", "arguments": {}}', [])  # the last cut short of its tag
    assert content == "Let me check." and calls == [("a", '{"x": 1}'), ("b", "{}")]
    assert Hermes().parse("<tool_call>not json</tool_call>", []) == ("<tool_call>not json</tool_call>", [])
    plan = ToolPlan("auto", [], None, parser=Hermes())
    stream, text, out = ToolStream(plan), "", []
    for piece in ["Hi <", "tool_", "call>", '{"name": "a", "arguments": {}}</tool_call>']:
        text += piece
        out.append(stream.delta(piece, text, False))
    out.append(stream.delta("", text, True))
    assert out[:4] == [{"content": "Hi "}, {}, {}, {}] and out[4]["tool_calls"][0]["function"]["name"] == "a"


def test_the_llama3_json_parser_and_its_stream():
    content, calls = Llama3Json().parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", '
                                        '"parameters": {}}', [])
    assert content is None and calls == [("a", '{"x": 1}'), ("b", "{}")]
    assert Llama3Json().parse("It is {sunny}.", []) == ("It is {sunny}.", [])
    assert Llama3Json().parse('{"no": "name"}', []) == ('{"no": "name"}', [])
    plan = ToolPlan("auto", [], None, parser=Llama3Json())
    for pieces, streamed_before_end in [(["<|py", "thon_tag|>", '{"name": "a", "parameters": {}}'], ""),
                                        (["It is", " sunny."], "It is sunny."), ([" ", "{", '"name": "a"}'], "")]:
        stream, text, got = ToolStream(plan), "", ""
        for piece in pieces:
            text += piece
            got += stream.delta(piece, text, False).get("content", "")
        assert got == streamed_before_end
        last = stream.delta("", text, True)
        assert ("tool_calls" in last) == (streamed_before_end == "")


def streamed_pieces(plan: ToolPlan, pieces: list[str]) -> tuple[str, dict]:
    """(the content a stream sent before the end, its last delta) of an answer given in pieces."""
    stream, text, got = ToolStream(plan), "", ""
    for piece in pieces:
        text += piece
        got += stream.delta(piece, text, False).get("content", "")
    return got, stream.delta("", text, True)


def test_the_mistral_parser_its_stream_and_its_short_ids():
    mistral = Mistral()
    assert mistral.parse('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
                         []) == (None, [("a", '{"x": 1}'), ("b", "{}")])
    # the tag is a special token, left out of the text: the array alone is the calls
    assert mistral.parse(' [{"name": "a", "arguments": {"x": 1}}]', []) == (None, [("a", '{"x": 1}')])
    assert mistral.parse('Sure. [TOOL_CALLS][{"name": "a", "arguments": {}}]', []) == ("Sure.", [("a", "{}")])
    assert mistral.parse("[1] is a citation.", []) == ("[1] is a citation.", [])
    assert mistral.parse('[{"x": 1}]', []) == ('[{"x": 1}]', [])
    plan = ToolPlan.of([Tool.model_validate(t) for t in TOOLS], "auto", "mistral")
    assert isinstance(plan.parser, Mistral)
    content, calls = plan.message('[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    assert content is None and all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)  # as its templates ask
    named = ToolPlan.of([Tool.model_validate(t) for t in TOOLS], {"type": "function", "function": {
        "name": "get_time"}}, "mistral")
    assert len(named.message('{"zone": "UTC"}')[1][0]["id"]) == 9
    assert streamed_pieces(plan, ["Let me see", " [TOOL", "_CALLS]", '[{"name": "a", "arguments": {}}]'])[0] == \
        "Let me see "
    got, last = streamed_pieces(plan, ["[", '{"name": "a", ', '"arguments": {}}]'])
    assert got == "" and last["tool_calls"][0]["function"] == {"name": "a", "arguments": "{}"}
    assert streamed_pieces(plan, ["It is", " sunny."])[0] == "It is sunny."


def test_the_pythonic_parser_and_its_stream():
    parse = Pythonic().parse
    assert parse('[get_weather(city="Paris"), get_time(zone="UTC", n=2, ok=True, tags=["a"])]', []) == (None, [
        ("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "UTC", "n": 2, "ok": true, "tags": ["a"]}')])
    for text in ["[get_weather('Paris')]", "[f(**x)]", "[f(x=g())]", "[]", "[1, 2]", "It is sunny.", "[f(x=1)"]:
        assert parse(text, []) == (text, []), text  # not calls with literal keyword arguments: text
    plan = ToolPlan("auto", [], None, parser=Pythonic())
    got, last = streamed_pieces(plan, ["[get_", 'weather(city=', '"Paris")]'])
    assert got == "" and last["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert streamed_pieces(plan, ["It is", " sunny."]) == ("It is sunny.", {})


def test_the_qwen3_coder_parser_reads_values_as_the_schema_types_them():
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                               "metric": {"type": "boolean"}, "where": {"type": "object"}}}
    tools = [Tool.model_validate({"type": "function", "function": {"name": "forecast", "parameters": schema}})]
    text = ("I will look. <tool_call>\n<function=forecast>\n<parameter=city>\n42\n</parameter>\n<parameter=days>"
            "\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=where>\n{\"lat\": 1}\n"
            "</parameter>\n<parameter=note>\nrain, maybe\n</parameter>\n</function>\n</tool_call>")
    content, calls = Qwen3Coder().parse(text, tools)
    assert content == "I will look." and [(n, json.loads(a)) for n, a in calls] == [
        ("forecast", {"city": "42", "days": 3, "metric": True, "where": {"lat": 1}, "note": "rain, maybe"})]
    # cut short by max_tokens: what was written
    assert Qwen3Coder().parse("<tool_call>\n<function=forecast>\n<parameter=days>\nx", tools)[1] == [
        ("forecast", '{"days": "x"}')]
    assert Qwen3Coder().parse("<tool_call>{}</tool_call>", tools) == ("<tool_call>{}</tool_call>", [])


def test_ollamas_chat_takes_tools_where_the_server_reads_calls(server, smol):
    from inferlab.server.ollama import tool_message
    reply = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": ASK, "tools": TOOLS, "stream": False,
                                                       "options": {"temperature": 0, "num_predict": 12}}, timeout=60)
    message = reply.json()["message"]  # this small model writes no call: its text, as without tools
    assert reply.status_code == 200 and message["content"] and "tool_calls" not in message
    plan = ToolPlan("auto", [], None, parser=Hermes())
    assert tool_message(*plan.message('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                      '</tool_call>')) == {"role": "assistant", "content": "Sure.", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}  # Ollama's: arguments an object
    with running_server(smol, num_kv_blocks=32) as plain:  # no tool-call parser: said, not ignored
        r = httpx.post(f"{plain.url}/api/chat", json={"model": MODEL, "messages": ASK, "tools": TOOLS}, timeout=60)
        assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]
