"""Structured outputs (inferlab/structured/): a request's text matches its JSON schema, regex, choice
or grammar, greedy and sampled, alone and beside free requests that stay as they were; the server
takes each client's way to ask (OpenAI's response_format, vLLM's structured_outputs and guided_*,
llama.cpp's grammar, Ollama's format) and refuses what cannot be compiled."""
from __future__ import annotations

import json
import re

import httpx
import pytest
from test_server import MODEL, running_server

from inferlab import SamplingParams
from inferlab.structured import StructuredOutputsParams as Structured

ASK_JSON = [{"role": "user", "content": 'Give me a JSON object with key "answer" and value "Paris".'}]
CAPITAL = [{"role": "user", "content": "Name a European capital and its country as JSON."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                           "country": {"type": "string", "maxLength": 12}},
          "required": ["city", "country"], "additionalProperties": False}


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"city", "country"} and value["city"] in ("Paris", "London", "Rome") and \
        isinstance(value["country"], str) and len(value["country"]) <= 12


@pytest.fixture(scope="module")
def llm(smol):
    from inferlab import LLM
    return LLM(loaded=smol, num_kv_blocks=256)


def greedy(structured: Structured, max_tokens: int = 60) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=structured)


def test_each_kind_holds_the_text_to_it(llm):
    out = llm.chat(ASK_JSON, greedy(Structured(json_object=True)), use_tqdm=False)[0].outputs[0]
    assert json.loads(out.text) == {"answer": "Paris"} and out.finish_reason == "stop"
    out = llm.chat(CAPITAL, greedy(Structured(json=SCHEMA)), use_tqdm=False)[0].outputs[0]
    assert follows_schema(out.text) and out.finish_reason == "stop"
    for structured, holds in [
        (Structured(choice=["Paris", "London", "Zürich"]), lambda t: t in ("Paris", "London", "Zürich")),
        (Structured(regex=r"[A-Z][a-z]+, \d{4}"), lambda t: re.fullmatch(r"[A-Z][a-z]+, \d{4}", t)),
        (Structured(grammar='root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),  # GBNF
        (Structured(grammar='start: "maybe" | "so"'), lambda t: t in ("maybe", "so")),  # Lark
    ]:
        out = llm.chat(CAPITAL, greedy(structured), use_tqdm=False)[0].outputs[0]
        assert holds(out.text) and out.finish_reason == "stop", (structured, out.text)
    # the model's own first words, unconstrained, are none of these
    free = llm.chat(CAPITAL, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    assert not free.startswith(("{", "yes", "no", "Paris", "maybe"))


def test_sampled_answers_hold_to_the_schema_and_free_ones_beside_them_are_unchanged(llm):
    free = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.chat(ASK_JSON, free, use_tqdm=False)[0].outputs[0].token_ids
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=Structured(json=SCHEMA))
              for s in range(6)]
    outs = llm.chat([CAPITAL] * 6 + [ASK_JSON], [*params, free], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs[:6]]
    assert all(follows_schema(t) for t in texts) and len(set(texts)) > 1, texts
    assert outs[6].outputs[0].token_ids == alone
    assert not any(b.ref_count for b in llm.engine.block_manager.blocks)


def test_refusals(llm, make_llm):
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar, json_object; got regex, choice"):
        Structured(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one .* got none"):
        Structured()
    with pytest.raises(ValueError, match="the regex cannot be compiled: .*unclosed group"):
        Structured(regex="(")
    with pytest.raises(ValueError, match="the JSON schema is not valid JSON"):
        Structured(json="{")
    with pytest.raises(ValueError, match="the grammar cannot be compiled"):
        Structured(grammar="start: nothing_defined")
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams, got dict"):
        SamplingParams(structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="min_tokens cannot be used with structured_outputs"):
        SamplingParams(min_tokens=4, structured_outputs=Structured(choice=["a"]))
    spec = make_llm(num_kv_blocks=64, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="prompt 0: structured outputs are not supported with speculative decoding"):
        spec.generate("hi", greedy(Structured(regex="a+")), use_tqdm=False)
    assert not spec.engine.requests and not llm.engine.requests


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=256) as s:
        yield s


def test_every_clients_way_to_ask(server):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x")
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=60,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "capital", "schema": SCHEMA}})
    assert follows_schema(chat.choices[0].message.content) and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=ASK_JSON, temperature=0, max_tokens=60, stream=True,
                                            response_format={"type": "json_object"})
    assert json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)) == {"answer": "Paris"}
    for field in ({"structured_outputs": {"choice": ["left", "right"]}}, {"guided_choice": ["left", "right"]}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Turn", "max_tokens": 5, "temperature": 0,
                                                             **field}, timeout=60).json()
        assert r["choices"][0]["text"] in ("left", "right") and r["choices"][0]["finish_reason"] == "stop", r
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Year:", "max_tokens": 9, "temperature": 0,
                                                         "grammar": 'root ::= [1-2] [0-9] [0-9] [0-9]'}, timeout=60)
    assert re.fullmatch(r"[12]\d{3}", r.json()["choices"][0]["text"]), r.text
    r = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": CAPITAL, "stream": False,
                                                   "format": SCHEMA, "options": {"temperature": 0}}, timeout=60)
    assert follows_schema(r.json()["message"]["content"]), r.text
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": ASK_JSON[0]["content"],
                                                       "stream": False, "format": "json", "options": {
                                                           "temperature": 0, "repeat_penalty": 1, "num_predict": 60}},
                   timeout=60)  # (unset, a sampled JSON could run on for minutes)
    assert isinstance(json.loads(r.json()["response"]), dict), r.text


def test_a_steps_guided_rows_are_masked_together_as_each_alone(llm):
    """mask_rows: the rows it is given (not the others) get -inf wherever each grammar's own bitmask
    says no, a padded row's padding too."""
    import numpy as np
    import torch

    from inferlab.structured.guide import mask_rows
    grammars = llm.engine.grammars
    guides = [grammars.guide(Structured(choice=["yes", "no"])), grammars.guide(Structured(regex="[0-9]+"))]
    vocab = guides[0].vocab_size
    logits = torch.randn(3, vocab + 64)
    masked = logits.clone()
    mask_rows(masked, [(0, guides[0]), (2, guides[1])])
    for row, guide in ((0, guides[0]), (2, guides[1])):
        bits = np.unpackbits(np.frombuffer(guide.matcher.compute_bitmask(), np.uint8), bitorder="little")[:vocab]
        want = logits[row].clone()
        want[:vocab][torch.from_numpy(bits == 0)] = float("-inf")
        want[vocab:] = float("-inf")
        assert torch.equal(masked[row], want) and 0 < int(bits.sum()) < vocab
    assert torch.equal(masked[1], logits[1])
