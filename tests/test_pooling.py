"""Embeddings (inferlab/pooling.py): `LLM.embed`, /v1/embeddings and Ollama's /api/embed give a prompt's
last-token hidden state, the same whether the prompt runs alone, batched beside generations, chunked
or read from the prefix cache; they leave generations' answers and the KV pool as they were. The
vector equals HF transformers' in test_hf_parity.py."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from test_server import MODEL, running_server

from inferlab import PoolingParams, SamplingParams
from inferlab.config import EngineConfig
from inferlab.engine import LLMEngine

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.",
         "Turtles are reptiles with a shell."]


def vectors(outs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in outs])


@pytest.fixture(scope="module")
def alone(smol) -> np.ndarray:
    """Each text's vector, embedded alone by an engine of its own."""
    from inferlab import LLM
    llm = LLM(loaded=smol, num_kv_blocks=64, enable_prefix_caching=False)
    return np.array([llm.embed(t, use_tqdm=False)[0].outputs.embedding for t in TEXTS])


def test_vectors_are_unit_length_and_each_texts_own(alone):
    assert alone.shape == (3, 576)
    assert np.allclose(np.linalg.norm(alone, axis=1), 1, atol=1e-5)
    sims = alone @ alone.T
    assert sims[np.triu_indices(3, 1)].max() < 0.9  # (a plain LM's vectors: no ranking of meaning is claimed)


def test_the_same_vector_batched_chunked_and_from_the_prefix_cache(make_llm, alone):
    llm = make_llm(num_kv_blocks=256, block_size=4, max_num_batched_tokens=8)  # a 12-token text: two chunks
    batched = vectors(llm.embed(TEXTS, use_tqdm=False))
    assert np.abs(batched - alone).max() < 1e-5
    again = llm.embed(TEXTS, use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in again)  # whole blocks of them came from the cache
    assert np.abs(vectors(again) - alone).max() < 1e-5
    raw = llm.embed(TEXTS[0], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    assert np.linalg.norm(raw) > 2
    assert np.abs(np.array(raw) / np.linalg.norm(raw) - alone[0]).max() < 1e-5


def test_generations_beside_embeddings_answer_as_alone_and_every_block_comes_back(smol, alone):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_num_batched_tokens=16), loaded=smol)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run() -> dict:
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                engine.check_integrity()
                if out.finished:
                    finals[out.request_id] = out
        return finals
    engine.add_request("solo", TEXTS[0], greedy)
    want = run()["solo"].outputs[0].token_ids
    engine.block_manager.reset_prefix_cache()
    engine.add_request("gen", TEXTS[0], greedy)
    for i, text in enumerate(TEXTS):
        engine.add_request(f"emb{i}", text, PoolingParams())
    finals = run()
    assert finals["gen"].outputs[0].token_ids == want and finals["gen"].embedding is None
    for i in range(3):
        out = finals[f"emb{i}"]
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "stop"
        assert np.abs(np.array(out.embedding) - alone[i]).max() < 1e-5
    assert not any(b.ref_count for b in engine.block_manager.blocks)


def test_an_embedding_aborted_mid_prompt_frees_its_blocks(smol):
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_num_batched_tokens=16, enable_prefix_caching=False),
                       loaded=smol)
    engine.add_request("e", " ".join(["word"] * 100), PoolingParams())
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort_request("e")
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.embedding is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.check_integrity()


def test_refusals(make_llm):
    llm = make_llm(num_kv_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="have 576 dimensions"):
        llm.embed("hello", PoolingParams(dimensions=128), use_tqdm=False)
    with pytest.raises(ValueError, match="normalize must be true or false"):
        PoolingParams(normalize="yes")
    with pytest.raises(ValueError, match="prompt 1: the prompt has 100 tokens"):
        llm.embed(["hello", {"prompt_token_ids": [1] * 100}], use_tqdm=False)
    with pytest.raises(TypeError, match="pooling_params must be a PoolingParams"):
        llm.embed("hello", SamplingParams(), use_tqdm=False)
    assert not llm.engine.requests  # nothing of the refused calls stays
    out = llm.embed("hello", use_tqdm=False)[0]
    assert repr(out.outputs) == "EmbeddingOutput(hidden_size=576)"


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=64, max_model_len=128) as s:
        yield s


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_openai_embeddings_route(server, alone):
    r = post(server, "/v1/embeddings", {"model": MODEL, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert np.abs(np.array([d["embedding"] for d in body["data"]]) - alone).max() < 1e-5
    ids = post(server, "/tokenize", {"prompt": TEXTS[0]}).json()["tokens"]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(ids)
    # base64 (what OpenAI's Python client asks for), one string, token ids, and lists of them
    b64 = post(server, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()["data"][0]
    assert np.abs(np.frombuffer(base64.b64decode(b64["embedding"]), "<f4") - alone[0]).max() < 1e-5
    for given in (ids, [ids, ids]):
        data = post(server, "/v1/embeddings", {"input": given}).json()["data"]
        assert len(data) == (1 if given is ids else 2)
        assert all(np.abs(np.array(d["embedding"]) - alone[0]).max() < 1e-5 for d in data)
    # a text past the context: refused, or with truncate_prompt_tokens its last tokens embedded
    long = [1] * 200 + ids
    assert "more than the 127 this model pools" in post(server, "/v1/embeddings", {"input": long}).json()[
        "error"]["message"]
    cut = post(server, "/v1/embeddings", {"input": long, "truncate_prompt_tokens": len(ids)}).json()
    assert np.abs(np.array(cut["data"][0]["embedding"]) - alone[0]).max() < 1e-5
    assert cut["usage"]["prompt_tokens"] == len(ids)
    assert server.engine.engine.block_manager.num_free_blocks == server.engine.engine.block_manager.num_blocks


@pytest.mark.parametrize("body, status, words", [
    ({"input": []}, 400, "input is empty"),
    ({"input": ""}, 400, "the prompt is empty"),
    ({"input": "hi", "model": "other"}, 404, "does not exist"),
    ({"input": "hi", "dimensions": 64}, 400, "have 576 dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": [[1, 2], "hi"]}, 400, "input"),
    ({"input": [99999999]}, 400, "outside the vocabulary"),
    ({"input": "hi", "truncate_prompt_tokens": 500}, 400, "between 1 and 127"),
])
def test_openai_embeddings_refusals(server, body, status, words):
    r = post(server, "/v1/embeddings", body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert server.engine.engine.block_manager.num_free_blocks == server.engine.engine.block_manager.num_blocks


def test_openai_client_reads_the_vectors(server, alone):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    got = client.embeddings.create(model=MODEL, input=TEXTS[:2])  # sent as base64 and decoded by the client
    assert np.abs(np.array([d.embedding for d in got.data]) - alone[:2]).max() < 1e-5


def test_ollama_embed_routes(server, alone):
    body = post(server, "/api/embed", {"model": MODEL, "input": TEXTS}).json()
    assert np.abs(np.array(body["embeddings"]) - alone).max() < 1e-5
    assert body["model"] == MODEL and body["prompt_eval_count"] > 3 and body["total_duration"] > 0
    one = post(server, "/api/embed", {"model": f"{MODEL}:latest", "input": TEXTS[0]}).json()["embeddings"]
    assert len(one) == 1 and np.abs(np.array(one[0]) - alone[0]).max() < 1e-5
    assert post(server, "/api/embed", {"model": MODEL, "input": ""}).json()["embeddings"] == []
    # past the context: its first tokens (truncate, the default), or refused
    long = TEXTS[0] + " and" * 300
    cut = post(server, "/api/embed", {"model": MODEL, "input": long}).json()
    assert len(cut["embeddings"]) == 1 and cut["prompt_eval_count"] == 127
    refused = post(server, "/api/embed", {"model": MODEL, "input": long, "truncate": False})
    assert refused.status_code == 400 and "more than the 127" in refused.json()["error"]
    bad = post(server, "/api/embed", {"model": MODEL, "input": ["hi", ""]})
    assert bad.status_code == 400 and bad.json() == {"error": "input 1 is empty"}
    # the older route: one prompt, its vector as the model gives it (not normalised)
    old = np.array(post(server, "/api/embeddings", {"model": MODEL, "prompt": TEXTS[0]}).json()["embedding"])
    assert np.linalg.norm(old) > 2 and np.abs(old / np.linalg.norm(old) - alone[0]).max() < 1e-5
    show = post(server, "/api/show", {"model": MODEL}).json()
    assert "embedding" in show["capabilities"]
    assert server.engine.engine.block_manager.num_free_blocks == server.engine.engine.block_manager.num_blocks
