"""Property-based fuzzing of the HTTP API with random bodies of three kinds:

- valid: every field valid (random values, random subset) -> 200 with well-formed choices;
- one fault: a valid body with one field made definitely invalid -> a 4xx OpenAI-style error;
- chaos: any mix of valid and invalid fields, values and types, or no dict at all -> never a 5xx.

Afterwards nothing leaks: no request runs or waits, every KV block is free, and uvicorn logged no
error.
"""
from __future__ import annotations

import json
import os
import unicodedata

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_server import CHAT, CMPL, MODEL, running_server, sse_data

INT64 = (-2**63, 2**63 - 1)
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6),
                 st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))

# -- valid bodies: max_tokens is always there and tiny (absent would mean "up to the context")
# at least one character that is not a control or format one: a prompt of only those (U+0004...)
# can come out of the tokenizer as no tokens at all, which is a 400 ("the prompt is empty")
TEXT = st.text(min_size=1, max_size=30).filter(lambda s: any(unicodedata.category(c)[0] != "C" for c in s))
TOKEN_IDS = st.lists(st.integers(0, 49151), min_size=1, max_size=8)  # the vocabulary is 49152
VALID = {
    "model": st.just(MODEL),
    "temperature": st.one_of(st.just(0), st.floats(0, 2)),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "n": st.integers(1, 2),
    "seed": st.integers(*INT64),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "min_tokens": st.integers(0, 1),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "priority": st.integers(*INT64),
    "user": st.text(max_size=5),
    "some_unknown_field": JUNK,  # unknown fields are ignored, as OpenAI clients send some
    # vLLM's token restrictions: an allowed set or bad words may leave a constraint nothing it takes
    "allowed_token_ids": st.lists(st.integers(0, 49151), min_size=1, max_size=4),
    "bad_words": st.lists(st.text(min_size=1, max_size=4).filter(str.strip), max_size=3),
    "skip_special_tokens": st.booleans(),
    "truncate_prompt_tokens": st.sampled_from([-1, 1, 2, 5]),
}
VALID_CMPL = {**VALID, "logprobs": st.one_of(st.none(), st.integers(0, 20)), "echo": st.booleans(),
              "prompt_logprobs": st.one_of(st.none(), st.integers(0, 20))}
PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})
CONTENT = st.one_of(st.text(max_size=30), st.lists(PART, max_size=2))
# only an assistant's message (one that called tools) may lack its content, or hold an empty array, as OpenAI's
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "tool"]),
                           "content": st.one_of(st.text(max_size=30), st.lists(PART, min_size=1, max_size=2))},
                          optional={"name": st.text(max_size=5)}),
    st.fixed_dictionaries({"role": st.just("assistant")},
                          optional={"content": st.one_of(st.none(), CONTENT), "name": st.text(max_size=5)}))
VALID_CHAT = {**VALID, "max_completion_tokens": st.one_of(st.none(), st.integers(1, 4)),
              "logprobs": st.booleans(), "add_generation_prompt": st.booleans()}
# structured outputs and tools: at most one constraint a valid body (two are a 400), without min_tokens
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": False}}}
CONSTRAINTS = st.sampled_from([
    {"guided_choice": ["yes", "no"]}, {"guided_regex": "[a-c]{1,3}"}, {"response_format": {"type": "json_object"}},
    {"structured_outputs": {"choice": ["left", "right"]}}, {"response_format": {"type": "text"}},
    {"tools": [TOOL], "tool_choice": "none"}])
CHAT_CONSTRAINTS = st.one_of(CONSTRAINTS, st.sampled_from([
    {"tools": [TOOL], "tool_choice": "required"}, {"tools": [TOOL], "tool_choice": {"type": "function",
                                                                                     "function": {"name": "f"}}}]))
REQUIRED = {
    CMPL: {"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3), TOKEN_IDS,
                               st.lists(TOKEN_IDS, min_size=1, max_size=3)), "max_tokens": st.integers(1, 4)},
    CHAT: {"messages": st.lists(MESSAGE, min_size=1, max_size=3), "max_tokens": st.integers(1, 4)},
}

# -- faults: patches that make a valid body definitely invalid
NO_MCT = {"max_completion_tokens": None}  # in chat it would stand in for max_tokens
NO_ECHO = {"echo": False}  # with echo, max_tokens 0 is valid: the prompt alone, scored
COMMON_FAULTS = [
    {"model": "gpt-4"}, {"model": 5},
    *({"max_tokens": v, **NO_MCT, **NO_ECHO} for v in (0, -1, 10**9, 2**64, "4", 2.5, True, [])),
    *({"temperature": v} for v in (-0.5, 101, "hot", float("nan"), float("inf"), True)),
    *({"top_p": v} for v in (0, -0.1, 1.5, float("nan"), "1")),
    *({"top_k": v} for v in (-2, "5", 1.5, 2**63)),
    *({"min_p": v} for v in (-0.1, 1.1)),
    *({k: v} for k in ("presence_penalty", "frequency_penalty") for v in (2.5, -3, "x")),
    *({"repetition_penalty": v} for v in (0, -1, 11)),
    *({"n": v} for v in (0, -1, 65, 1000, "2", 1.5)),
    *({"seed": v} for v in ("s", 1.5, 2**64)),
    *({"stop": v} for v in ("", [""], 5, [5], {"a": 1})),
    *({"stop_token_ids": v} for v in ([-1], "x", [1.5], 3, [49152])),
    *({"min_tokens": v} for v in (-1, 10, "1")),
    *({k: v} for k in ("ignore_eos", "include_stop_str_in_output", "stream") for v in ("yes", 1)),
    {"stream": False, "stream_options": {"include_usage": True}},
    {"stream": True, "stream_options": "x"}, {"stream": True, "stream_options": {"include_usage": "x"}},
    *({"priority": v} for v in ("high", 1.5, 2**64)),
    {"user": 5},
    {"guided_regex": "("}, {"guided_choice": []}, {"response_format": {"type": "xml"}}, {"response_format": "json"},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}}, {"structured_outputs": {"json": {"type": 5}}},
    {"guided_json": "{", "min_tokens": 0}, {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
]
FAULTS = {
    CMPL: [*COMMON_FAULTS,
           *({"prompt": v} for v in ("", [], [[]], [-1], [60000], [[1], [-1]], 5, None, "\ud800", ["a", "\udfff"],
                                      [1, "a"], {"text": "hi"})),
           *({"logprobs": v} for v in (21, -1, "2", True)), *({"prompt_logprobs": v} for v in (21, -1, "2")),
           {"echo": "yes"}, {"suffix": "the end"}, *({"truncate_prompt_tokens": v} for v in (0, -2, "3")),
           *({"allowed_token_ids": v} for v in ([], [-1], [49152], "1")), {"bad_words": [""]},
           {"skip_special_tokens": "no"}],
    CHAT: [*COMMON_FAULTS,
           *({"messages": v} for v in ([], "hi", None, [{"role": "bot", "content": "x"}], [{"content": "x"}],
                                       [{"role": "user"}], [{"role": "user", "content": 5}],
                                       [{"role": "user", "content": "\ud800"}],
                                       [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}],
                                       [{"role": "user", "content": []}],
                                       ["hi"])),
           {"logprobs": "yes"}, {"logprobs": True, "top_logprobs": 21}, {"logprobs": True, "top_logprobs": -1},
           {"logprobs": False, "top_logprobs": 2}, {"tool_choice": "required", "tools": None},
           {"tools": [TOOL], "tool_choice": "auto"},
           {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
           {"tools": [{"type": "function"}], "tool_choice": "none"}, {"functions": [{"name": "f"}]},
           *({"max_completion_tokens": v} for v in (0, 10**9, "a")), {"add_generation_prompt": "yes"}],
}

# -- chaos: anything in any field
def loose(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, JUNK)


LOOSE_CONSTRAINTS = {k: loose(st.sampled_from(["[ab]+", ["a"], {"type": "json_object"}, {"regex": "a"}, [TOOL],
                                                "required", {"type": "function"}]))
                     for k in ("guided_choice", "guided_regex", "guided_json", "response_format", "structured_outputs",
                               "tools", "tool_choice", "json_schema", "grammar")}
CHAOS = {
    CMPL: st.fixed_dictionaries(
        {"prompt": loose(REQUIRED[CMPL]["prompt"]), "max_tokens": st.sampled_from([1, 2, 0, -1, 10**9, "4"])},
        optional={**{k: loose(v) for k, v in VALID_CMPL.items()}, **LOOSE_CONSTRAINTS}),
    CHAT: st.fixed_dictionaries(
        {"messages": loose(REQUIRED[CHAT]["messages"]), "max_tokens": st.sampled_from([1, 2, 0, -1, 10**9, "4"])},
        optional={**{k: loose(v) for k, v in VALID_CHAT.items()}, "max_completion_tokens": st.sampled_from([None, 1]),
                  **LOOSE_CONSTRAINTS}),
}

# /v1/responses, chaos only: items, function tools and formats, valid or not
RESP = "/v1/responses"
FLAT_TOOL = {"type": "function", **TOOL["function"]}
ITEM = st.one_of(
    MESSAGE.filter(lambda m: m["role"] != "tool"),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.text(max_size=4), "name": st.just("f"),
                           "arguments": st.sampled_from(['{"x": 1}', "{", ""])}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(max_size=4),
                           "output": st.one_of(st.text(max_size=8), st.lists(PART, max_size=2))}),
    st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "web_search_call", "message"])}), JUNK)
RESP_CHAOS = st.fixed_dictionaries(
    {"input": loose(st.one_of(TEXT, st.lists(ITEM, max_size=4))),
     "max_output_tokens": st.sampled_from([1, 2, 0, -1, "4"])},  # (left out: up to the context)
    optional={"stream": loose(st.booleans()),
              "instructions": loose(st.text(max_size=8)), "temperature": loose(st.floats(0, 2)),
              "tools": loose(st.lists(st.one_of(st.just(FLAT_TOOL), st.just(TOOL), st.just({"type": "web_search"}),
                                                JUNK), max_size=2)),
              "tool_choice": loose(st.sampled_from(["none", "auto", "required", {"type": "function", "name": "f"},
                                                    {"type": "function", "name": "g"}, {"type": "function"}])),
              "parallel_tool_calls": loose(st.booleans()),
              "text": loose(st.sampled_from([{"format": {"type": "json_object"}}, {"format": {"type": "xml"}},
                                             {"format": "json"}, {"format": {"type": "json_schema", "schema": 5}}])),
              "previous_response_id": loose(st.none()), "model": loose(st.just(MODEL)),
              "include": loose(st.just(["message.output_text.logprobs"])), "top_logprobs": loose(st.integers(-1, 21))})


@st.composite
def requests(draw) -> tuple[str, object, str]:
    """(path, body, what to expect: "ok", "4xx" or "no 5xx")."""
    path = draw(st.sampled_from([CMPL, CHAT, RESP]))
    if path == RESP:
        return path, draw(RESP_CHAOS), "no 5xx"
    kind = draw(st.sampled_from(["ok", "4xx", "no 5xx"]))
    if kind == "no 5xx":
        body = draw(st.one_of(CHAOS[path], CHAOS[CHAT if path == CMPL else CMPL], JUNK))
        return path, body, kind
    body = draw(st.fixed_dictionaries(REQUIRED[path], optional=VALID_CMPL if path == CMPL else VALID_CHAT))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if body.get("logprobs") is True and draw(st.booleans()):
        body["top_logprobs"] = draw(st.integers(0, 20))
    if draw(st.booleans()):
        for name in ("min_tokens", "allowed_token_ids", "bad_words"):  # (they could leave the grammar no token)
            body.pop(name, None)
        body.update(draw(CHAT_CONSTRAINTS if path == CHAT else CONSTRAINTS))
    if "allowed_token_ids" in body:  # allowed [0] and min_tokens 1 leave no token: a 400 (test_sampling.py)
        body.pop("min_tokens", None)
    if kind == "4xx":
        body.update(draw(st.sampled_from(FAULTS[path])))
    return path, body, kind


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=256) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def num_choices(path: str, body: dict) -> int:
    prompt = body.get("prompt")
    prompts = 1 if path == CHAT or isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)
    return prompts * body.get("n", 1)


def check_ok(r: httpx.Response, path: str, body: dict) -> None:
    assert r.status_code == 200, r.text
    n = num_choices(path, body)
    if not body.get("stream"):
        answer = r.json()
        assert [c["index"] for c in answer["choices"]] == list(range(n))
        assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
        u = answer["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 0
        return
    events = sse_data(r.text.splitlines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert not any("error" in e for e in chunks), chunks
    if (body.get("stream_options") or {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 0
        chunks = chunks[:-1]
    finished = [c["index"] for e in chunks for c in e["choices"] if c["finish_reason"]]
    assert sorted(finished) == list(range(n))  # each choice finishes exactly once


@settings(max_examples=int(os.environ.get("INFERLAB_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests())
def test_random_bodies_never_break_the_server(http, request):
    path, body, expect = request
    # json.dumps, not httpx's json=: it writes NaN and Infinity, as a sloppy client might
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    event(f"{expect}: {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text)
    if expect == "ok":
        check_ok(r, path, body)
    elif r.status_code >= 400 or expect == "4xx":
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    elif path == RESP:  # a response object, or its events to the last
        final = r.json() if not body.get("stream") else sse_data(r.text.splitlines())[-1]["response"]
        assert final["status"] in ("completed", "incomplete") and final["output"], final
    elif not body.get("stream"):
        assert r.json()["choices"]
    else:  # (a request's own rules may leave it no token: a client's error, told in the stream)
        events = sse_data(r.text.splitlines())
        assert events[-1] == "[DONE]" and not any(e.get("error", {}).get("type") == "server_error"
                                                  for e in events[:-1]), events


def test_after_fuzzing_nothing_leaked(server, http):
    assert http.get("/health").json() == {"status": "ok"}
    server.wait_idle()
    server.check_engine()
    assert [r.getMessage() for r in server.errors.records] == []
