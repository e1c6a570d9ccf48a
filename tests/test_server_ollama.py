"""Ollama's native API (/api/*) on the server: the same answers as the OpenAI endpoints under Ollama's
defaults, NDJSON streams whose closing line counts the tokens, its model listing, and its
`{"error": ...}` refusals, with nothing left in the engine."""
from __future__ import annotations

import json

import httpx
import pytest
from test_server import MODEL, running_server

QUESTION = "What is the capital of France?"
OLLAMA_GREEDY = {"temperature": 0, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}  # Ollama's defaults


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol) as s:
        yield s


def post(server, path: str, body: dict | list, **kw) -> httpx.Response:
    if isinstance(body, dict) and isinstance(body.get("options"), str):  # a raw JSON text in its place
        text = json.dumps({**body, "options": None}).replace("null", body["options"])
        return httpx.post(f"{server.url}{path}", content=text, timeout=120, **kw)
    return httpx.post(f"{server.url}{path}", json=body, timeout=120, **kw)


def lines(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_generate_and_chat_answer_as_the_openai_endpoints_under_ollamas_defaults(server):
    messages = [{"role": "user", "content": QUESTION}]
    want = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 12, **OLLAMA_GREEDY}).json()
    want = want["choices"][0]["message"]["content"]
    assert want == "The capital of France is Paris."
    options = {"temperature": 0, "num_predict": 12, "num_ctx": 2048, "num_thread": 1}  # runtime ones: read, left
    whole = post(server, "/api/generate", {"model": MODEL, "prompt": QUESTION, "stream": False, "options": options})
    assert whole.json()["response"] == want and whole.json()["done"] is True
    assert whole.json()["done_reason"] == "stop"
    prompt_ids = post(server, "/tokenize", {"messages": messages}).json()["tokens"]
    streamed = lines(server, "/api/chat", {"model": f"{MODEL}:latest", "messages": messages, "options": options})
    *parts, last = streamed
    assert all(p["done"] is False and p["message"]["role"] == "assistant" for p in parts)
    assert "".join(p["message"]["content"] for p in parts) == want
    assert last["done"] is True and last["message"]["content"] == "" and last["done_reason"] == "stop"
    assert last["prompt_eval_count"] == len(prompt_ids)
    assert last["eval_count"] == len(parts) + 1  # each token a line (a stop token writes no text), then the close
    assert last["total_duration"] >= last["eval_duration"] > 0 and last["load_duration"] == 0
    # raw: the text as it is, as /v1/completions takes it; num_predict ends it with "length"
    raw = post(server, "/api/generate", {"model": MODEL, "prompt": "The capital of France is", "raw": True,
                                         "stream": False, "options": {"temperature": 0, "num_predict": 4}}).json()
    plain = post(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4,
                                            **OLLAMA_GREEDY}).json()
    assert raw["response"] == plain["choices"][0]["text"] and raw["done_reason"] == "length" and raw["eval_count"] == 4
    # a system message, and a last assistant message continued, as Ollama does
    system = post(server, "/api/generate", {"model": MODEL, "prompt": QUESTION, "system": "Answer in French.",
                                            "stream": False, "options": {"temperature": 0, "num_predict": 8}}).json()
    by_chat = post(server, "/v1/chat/completions", {"messages": [{"role": "system", "content": "Answer in French."},
                                                                 *messages], "max_tokens": 8, **OLLAMA_GREEDY}).json()
    assert system["response"] == by_chat["choices"][0]["message"]["content"]
    prefilled = [*messages, {"role": "assistant", "content": "The capital"}]
    cont = post(server, "/api/chat", {"model": MODEL, "messages": prefilled, "stream": False,
                                      "options": {"temperature": 0, "num_predict": 4}}).json()
    assert cont["message"]["content"] == " of France is Paris"
    server.wait_idle()
    server.check_engine()


def test_sampled_answers_follow_the_seed(server):
    body = {"model": MODEL, "prompt": "Tell me a story.", "stream": False, "options": {"seed": 7, "num_predict": 12}}
    first, again = (post(server, "/api/generate", body).json()["response"] for _ in range(2))
    other = post(server, "/api/generate", {**body, "options": {"seed": 8, "num_predict": 12}}).json()["response"]
    assert first == again and first != other


def test_model_listing(server):
    tags = httpx.get(f"{server.url}/api/tags", timeout=10).json()["models"]
    assert [m["name"] for m in tags] == [MODEL] and tags[0]["details"]["family"] == "llama"
    assert tags[0]["size"] > 50 * 2**20 and tags[0]["details"]["quantization_level"].isupper()
    show = post(server, "/api/show", {"model": MODEL}).json()
    assert show["model_info"]["llama.block_count"] == 30 and show["model_info"]["llama.embedding_length"] == 576
    assert post(server, "/api/show", {"model": "llama3"}).status_code == 404
    assert httpx.get(f"{server.url}/api/ps", timeout=10).json()["models"][0]["name"] == MODEL
    assert httpx.get(f"{server.url}/api/version", timeout=10).json()["version"]
    loaded = post(server, "/api/generate", {"model": MODEL}).json()  # Ollama's way to load a model
    assert loaded["done"] is True and loaded["done_reason"] == "load" and loaded["response"] == ""


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/generate", {"model": "llama3", "prompt": "hi"}, 404, "model 'llama3' not found"),
    ("/api/generate", {"prompt": "hi"}, 400, "model: Field required"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "format": "yaml"}, 400,
     'format must be "json" or a JSON schema'),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "format": {"type": 7}}, 400,
     "format: the JSON schema cannot be compiled"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="]}, 400, "images is not supported"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "images are not supported"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools.function: Field required"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "--tool-call-parser"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"mirostat": 2}}, 400, "options.mirostat 2"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"repeat_last_n": -2}}, 400,
     "options.repeat_last_n must be -1 (the whole context), 0 (no penalty) or more, got -2"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"warp": 9}}, 400, "options.warp is not an option"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_predict": 0}}, 400,
     "options.num_predict must be -1, -2 or at least 1, got 0"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"temperature": "hot"}}, 400,
     "options.temperature: Input should be a valid number"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"top_p": 2}}, 400, "top_p"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"num_keep": -1}}, 400,
     "options.num_keep must be an integer >= 0, got -1"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400,
     "no room for an answer in this model's context of 8192 tokens"),
    ("/api/generate", {"model": MODEL, "options": "[" * 1000 + "]" * 1000}, 400, "not JSON"),  # (a 500)
    ("/api/show", {"model": ["x"]}, 404, "model ['x'] not found"),  # (a 500: a list in a set)
    ("/api/show", [1], 400, "the request body must be a JSON object"),
    ("/api/create", {"model": "mine", "from": MODEL}, 404, "/api/create is not supported by this server"),
    ("/api/generate", [1], 400, "the request body must be a JSON object"),
])
def test_bad_requests_are_one_line_ollama_errors(server, path, body, status, message):
    r = post(server, path, body)
    assert r.status_code == status and message in r.json()["error"], r.text
    server.check_engine()


def test_what_ollamas_clients_send_is_read_as_ollama_reads_it(server):
    """null for a default, a whole-number float for an integer, options its typed clients carry, a
    cap past the context, a name in other case, keep_alive 0: as Ollama's server takes them."""
    messages = [{"role": "user", "content": QUESTION, "images": None}]
    body = {"model": MODEL.lower(), "messages": messages, "stream": False, "format": None, "tools": None, "raw": None,
            "options": {"temperature": 0, "num_predict": 8.0, "seed": None, "embedding_only": False, "num_gqa": None,
                        "rope_frequency_base": 10000.0}}
    out = post(server, "/api/chat", body).json()
    assert out["message"]["content"] == "The capital of France is Paris." and out["done_reason"] == "stop", out
    capped = post(server, "/api/chat", {**body, "options": {"temperature": 0, "num_predict": 8190}}).json()
    assert capped["message"]["content"] == out["message"]["content"]  # a cap, not a reservation of 8,190 tokens
    unloaded = post(server, "/api/generate", {"model": MODEL, "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload"
    assert httpx.get(f"{server.url}/", timeout=10).status_code == 200  # Ollama's CLI checks this first
    assert httpx.head(f"{server.url}/", timeout=10).status_code == 200


def test_a_conversation_longer_than_the_context_loses_its_oldest_exchanges(smol):
    """As Ollama does (Open WebUI's long chats kept working there): the system message stays, then the
    newest messages that leave room for the answer (a context of 1,024 tokens: a short prefill). A
    prompt to /api/generate loses its middle instead: its first num_keep tokens and its end stay."""
    system = {"role": "system", "content": "You are terse."}
    turns = [{"role": role, "content": f"Message {i}: " + "words " * 40}
             for i in range(60) for role in ("user", "assistant")][:-1]
    body = {"model": MODEL, "messages": [system, *turns], "stream": False, "options": {"temperature": 0,
                                                                                         "num_predict": 4}}
    with running_server(smol, max_model_len=1024) as small:
        out = post(small, "/api/chat", body).json()
        assert out["done"] is True and 1024 // 2 < out["prompt_eval_count"] <= 1024 - 4, out
        kept = post(small, "/tokenize", {"messages": [system, *turns[-7:]]}).json()["count"]  # a few turns' worth
        assert out["prompt_eval_count"] > kept
        text = "The start. " + "filler words " * 600 + "The end."
        ids = post(small, "/tokenize", {"prompt": text}).json()["tokens"]
        assert len(ids) > 1024
        for keep in (4, 0):
            cut = {"model": MODEL, "prompt": text, "raw": True, "stream": False,
                   "options": {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 6, "num_keep": keep}}
            got = post(small, "/api/generate", cut).json()
            assert got["prompt_eval_count"] == 1024 - 6 and got["eval_count"] == 6, got
            kept_ids = ids[:keep] + ids[len(ids) - (1024 - 6 - keep):]  # the same answer as those ids
            plain = post(small, "/v1/completions", {"prompt": kept_ids, "max_tokens": 6, "temperature": 0}).json()
            assert got["response"] == plain["choices"][0]["text"]
        small.wait_idle()
        small.check_engine()


def test_a_stream_left_midway_is_aborted(server):
    body = {"model": MODEL, "prompt": "Count to one thousand.", "options": {"num_predict": 2000, "temperature": 0}}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body, timeout=120) as r:
        first = next(r.iter_lines())
    assert json.loads(first)["done"] is False
    server.wait_idle()
    server.check_engine()


def test_the_api_key_guards_ollamas_routes_too(smol):
    with running_server(smol, api_key="sesame") as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False,
                "options": {"num_predict": 1}}
        refused = post(s, "/api/chat", body)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]  # Ollama's shape under /api
        assert httpx.get(f"{s.url}/api/tags", timeout=10).status_code == 401
        assert post(s, "/api/chat", body, headers={"Authorization": "Bearer sesame"}).json()["done"] is True
