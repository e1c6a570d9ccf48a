"""Classification and scoring (inferlab/pooling.py, model/layers/classifier.py): a
`*ForSequenceClassification` checkpoint's classes, and a reranker's pair scores, equal transformers'
on checkpoints its own classes saved; an embedding model scores a pair by cosine similarity; the
routes /classify, /score and /rerank answer in vLLM's shape and refuse what cannot be done."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import transformers
from test_hf_models import build_checkpoint, train_tokenizer
from test_server import MODEL, running_server

from inferlab import LLM, EngineConfig, PoolingParams
from inferlab.model.base import ModelLoadError
from inferlab.model.loader import load_model

QUERY = "what is a cat"
DOCS = ["a cat is an animal", "def add(a, b): numbers 12345", "the cat sat on the mat", "symbols {}[]!?"]
SPECS = {  # name -> (config class, model class, config overrides)
    "reranker": ("Qwen3Config", "Qwen3ForSequenceClassification", {"head_dim": 32, "num_labels": 1}),
    "sentiment": ("LlamaConfig", "LlamaForSequenceClassification",
                  {"num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"}}),
    "tags": ("Qwen2Config", "Qwen2ForSequenceClassification",
             {"num_labels": 2, "problem_type": "multi_label_classification"}),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tok = train_tokenizer()
    return {name: build_checkpoint(name, str(tmp_path_factory.mktemp(name)), tok, spec)
            for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def llms(ckpts):
    # fp32, and chunks of 4 tokens, so that every prompt of more than 4 runs in pieces
    return {name: LLM(c.path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
            for name, c in ckpts.items()}


@torch.no_grad()
def hf_logits(ckpt, ids: list[int]) -> torch.Tensor:
    return ckpt.hf(torch.tensor([ids])).logits[0]


def hf_pair(ckpt) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_file=f"{ckpt.path}/tokenizer.json")


@pytest.mark.parametrize("name", SPECS)
def test_classes_equal_transformers(ckpts, llms, name):
    ckpt, llm = ckpts[name], llms[name]
    prompts = [{"prompt_token_ids": p} for p in ckpt.prompts]
    probs = [o.outputs.probs for o in llm.classify(prompts, use_tqdm=False)]
    logits = [o.outputs.probs for o in llm.classify(prompts, PoolingParams(use_activation=False), use_tqdm=False)]
    for ids, p, lg in zip(ckpt.prompts, probs, logits):
        want = hf_logits(ckpt, ids)
        assert np.abs(np.array(lg) - want.numpy()).max() < 1e-4
        act = want.softmax(-1) if name == "sentiment" else want.sigmoid()  # multi-label, or one class: each its own
        assert np.abs(np.array(p) - act.numpy()).max() < 1e-5
    assert llm.labels == {"reranker": ["LABEL_0"], "sentiment": ["neg", "neu", "pos"],
                          "tags": ["LABEL_0", "LABEL_1"]}[name]
    assert not any(b.ref_count for b in llm.engine.block_manager.blocks)


def test_a_reranker_scores_pairs_as_transformers_reads_them(ckpts, llms):
    ckpt, llm = ckpts["reranker"], llms["reranker"]
    tok = hf_pair(ckpt)
    outs = llm.score(QUERY, DOCS, use_tqdm=False)
    for doc, out in zip(DOCS, outs):
        ids = tok(QUERY, doc)["input_ids"]
        assert out.prompt_token_ids == ids
        assert abs(out.outputs.score - hf_logits(ckpt, ids).sigmoid().item()) < 1e-5
    pairwise = llm.score(DOCS[:2], DOCS[2:], use_tqdm=False)  # two lists: pair by pair
    assert [o.prompt_token_ids for o in pairwise] == [tok(a, b)["input_ids"] for a, b in zip(DOCS[:2], DOCS[2:])]
    assert len({round(o.outputs.score, 6) for o in outs}) == len(DOCS)  # the documents are told apart


@pytest.mark.parametrize("tied", [True, False])
def test_a_causal_lm_read_as_qwen3_reranker_scores_yes_against_no(tmp_path, tied):
    """vLLM's recipe for Qwen3-Reranker, a Qwen3ForCausalLM checkpoint: hf_overrides make it a
    one-class head, yes's LM-head row less no's (tied: the embedding's rows)."""
    tok = train_tokenizer()
    ckpt = build_checkpoint("causal", str(tmp_path), tok, ("Qwen3Config", "Qwen3ForCausalLM",
                                                           {"head_dim": 32, "tie_word_embeddings": tied}))
    no, yes = "Ġa", "Ġthe"  # two tokens of the test vocabulary stand for "no" and "yes"
    overrides = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": [no, yes],
                 "is_original_qwen3_reranker": True}
    llm = LLM(ckpt.path, dtype="float32", num_kv_blocks=32, hf_overrides=overrides)
    for out in llm.score(QUERY, DOCS[:2], use_tqdm=False):
        with torch.no_grad():
            last = ckpt.hf(torch.tensor([out.prompt_token_ids])).logits[0, -1]
        want = torch.sigmoid(last[tok.token_to_id(yes)] - last[tok.token_to_id(no)]).item()
        assert abs(out.outputs.score - want) < 1e-5
    with pytest.raises(ModelLoadError, match="classifier_from_token: 'no' is not a token of this vocabulary"):
        load_model(ckpt.path, "float32", torch.device("cpu"), hf_overrides={**overrides,
                                                                             "classifier_from_token": ["no", yes]})


RERANK = "<|im_start|>system\nJudge: yes or no.<|im_end|>\n<|im_start|>user\n<Query>: {query}\n<Document>: {document}" \
    "<|im_end|>\n<|im_start|>assistant\n"


def write_reranker_gguf(ckpt, tok, path: str, rows: list[int], extra: dict | None = None) -> str:
    """A Qwen3 reranker GGUF as llama.cpp's converter writes one: cls.output the LM head's yes and no
    rows (`rows`), the LM head itself left out, rank pooling and the pair template."""
    import gguf
    from test_moe_models import gguf_tensors
    cfg, w = ckpt.hf.config, gguf.GGUFWriter(path, "qwen3")
    for key, value in [("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads), ("pooling_type", 4),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim)]:
        w.add_uint32(f"qwen3.{key}", value)
    w.add_float32("qwen3.rope.freq_base", cfg.rope_parameters["rope_theta"])
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_array("qwen3.classifier.output_labels", ["yes", "no"])
    vocab = tok.get_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([3 if t.startswith("<|") else 1 for t in sorted(vocab, key=vocab.get)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_string("tokenizer.chat_template.rerank", RERANK)
    tensors = gguf_tensors(ckpt)
    head = tensors.pop("output.weight")
    for name, data in {**tensors, "cls.output.weight": head[rows], **(extra or {})}.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_reranker_gguf_scores_as_llama_cpp_does(tmp_path, monkeypatch):
    """llama.cpp's Qwen3-Reranker GGUF: the pair written into its rerank template, and the score the
    softmax of its two head rows' logits gives yes, P(yes) / (P(yes) + P(no)) of the causal LM."""
    monkeypatch.setenv("INFERLAB_MODEL_CACHE", "0")
    tok = train_tokenizer()
    ckpt = build_checkpoint("causal", str(tmp_path / "hf"), tok, ("Qwen3Config", "Qwen3ForCausalLM",
                                                                  {"head_dim": 32, "tie_word_embeddings": False}))
    yes, no = tok.token_to_id("Ġthe"), tok.token_to_id("Ġa")  # two tokens of the test vocabulary stand for them
    llm = LLM(write_reranker_gguf(ckpt, tok, str(tmp_path / "r.gguf"), [yes, no]), dtype="float32", num_kv_blocks=32)
    assert llm.labels == ["yes"]
    for doc, out in zip(DOCS[:2], llm.score(QUERY, DOCS[:2], use_tqdm=False)):
        prompt = RERANK.replace("{query}", QUERY).replace("{document}", doc)
        assert out.prompt_token_ids == llm.get_tokenizer().encode(prompt, add_special_tokens=False)
        assert out.prompt_token_ids[0] == tok.token_to_id("<|im_start|>")  # special tokens read as such
        with torch.no_grad():
            last = ckpt.hf(torch.tensor([out.prompt_token_ids])).logits[0, -1]
        assert abs(out.outputs.score - torch.softmax(last[[yes, no]], -1)[0].item()) < 1e-5
    dense = np.zeros((ckpt.hf.config.hidden_size, ckpt.hf.config.hidden_size), np.float32)
    with pytest.raises(ModelLoadError, match="'cls.weight': a classification head with more than one matrix"):
        load_model(write_reranker_gguf(ckpt, tok, str(tmp_path / "bert.gguf"), [yes, no], {"cls.weight": dense}),
                   "float32", torch.device("cpu"))


def test_an_embedding_model_scores_by_cosine_similarity(make_llm):
    llm = make_llm(num_kv_blocks=64)
    texts = ["The capital of France is Paris.", "Paris is in France.", "Turtles have shells."]
    vecs = np.array([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)])
    outs = llm.score(texts[0], texts[1:], use_tqdm=False)
    assert np.allclose([o.outputs.score for o in outs], vecs[1:] @ vecs[0], atol=1e-5)
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode(texts[0]) + tok.encode(texts[1])


def test_refusals(ckpts, llms, make_llm):
    plain = make_llm(num_kv_blocks=16)
    with pytest.raises(ValueError, match="prompt 0: this model has no classification head"):
        plain.classify("hello", use_tqdm=False)
    assert plain.labels is None
    with pytest.raises(ValueError, match="head has 3 classes, and scoring pairs takes a reranker's one"):
        llms["sentiment"].score("a", "b", use_tqdm=False)
    with pytest.raises(ValueError, match="data_1 has 2 texts and data_2 3"):
        llms["reranker"].score(["a", "b"], ["c", "d", "e"], use_tqdm=False)
    with pytest.raises(ValueError, match="data_2 is empty"):
        llms["reranker"].score("a", [], use_tqdm=False)
    with pytest.raises(ValueError, match="task must be one of embed, classify"):
        PoolingParams(task="score")
    with pytest.raises(ModelLoadError, match="hf_overrides change an HF folder's config.json; .* is a file"):
        load_model(None, "float32", torch.device("cpu"), hf_overrides={"architectures": ["LlamaModel"]})
    with pytest.raises(ValueError, match="hf_overrides is not valid JSON"):
        EngineConfig(hf_overrides="{")
    assert not llms["sentiment"].engine.requests and not plain.engine.requests


@pytest.fixture(scope="module")
def reranker_server(ckpts):
    with running_server(load_model(ckpts["reranker"].path, "float32", torch.device("cpu")), num_kv_blocks=64,
                        max_model_len=64) as s:
        yield s


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_rerank_orders_documents_by_the_rerankers_score(ckpts, llms, reranker_server):
    want = [o.outputs.score for o in llms["reranker"].score(QUERY, DOCS, use_tqdm=False)]
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        docs = [DOCS[0], {"text": DOCS[1]}, *DOCS[2:]]  # Cohere's documents may be objects
        r = post(reranker_server, path, {"model": MODEL, "query": QUERY, "documents": docs, "top_n": 2})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == order[:2]
        assert [x["document"]["text"] for x in results] == [DOCS[i] for i in order[:2]]
        assert np.allclose([x["relevance_score"] for x in results], [want[i] for i in order[:2]], atol=1e-5)
    r = post(reranker_server, "/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False})
    assert [x["index"] for x in r.json()["results"]] == order and "document" not in r.json()["results"][0]
    tok = hf_pair(ckpts["reranker"])
    assert r.json()["usage"]["total_tokens"] == sum(len(tok(QUERY, d)["input_ids"]) for d in DOCS)
    # Cohere's max_tokens_per_doc: each document's first tokens are what is scored
    cut = [tok.decode(tok(d, add_special_tokens=False)["input_ids"][:2]) for d in DOCS]
    want = [o.outputs.score for o in llms["reranker"].score(QUERY, cut, use_tqdm=False)]
    r = post(reranker_server, "/v2/rerank", {"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 2})
    got = sorted(r.json()["results"], key=lambda x: x["index"])
    assert np.allclose([x["relevance_score"] for x in got], want, atol=1e-5) and got[0]["document"]["text"] == DOCS[0]


def test_score_and_classify_routes(llms, reranker_server):
    llm = llms["reranker"]
    r = post(reranker_server, "/v1/score", {"model": MODEL, "text_1": QUERY, "text_2": DOCS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert np.allclose([d["score"] for d in body["data"]],
                       [o.outputs.score for o in llm.score(QUERY, DOCS[:2], use_tqdm=False)], atol=1e-5)
    r = post(reranker_server, "/classify", {"model": MODEL, "input": DOCS})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    want = [o.outputs.probs for o in llm.classify(DOCS, use_tqdm=False)]
    assert [d["label"] for d in data] == ["LABEL_0"] * 4 and [d["num_classes"] for d in data] == [1] * 4
    assert np.allclose([d["probs"] for d in data], want, atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == sum(len(llm.get_tokenizer().encode(d)) for d in DOCS)


@pytest.mark.parametrize("path, body, words", [
    ("/rerank", {"query": "a", "documents": []}, "documents is empty"),
    ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n must be 0"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1 has 2 texts and text_2 3"),
    ("/score", {"text_1": "a", "text_2": "b", "model": "other"}, "does not exist"),
    ("/classify", {"input": []}, "input is empty"),
    ("/rerank", {"query": "a", "documents": ["b"], "truncate_prompt_tokens": 8}, "truncate_prompt_tokens is not "
                                                                                  "supported for pairs"),
    ("/rerank", {"query": "a", "documents": ["b"], "max_tokens_per_doc": 0}, "max_tokens_per_doc must be at least 1"),
    ("/classify", {"input": "word " * 70}, "more than the 63 this model pools"),
])
def test_route_refusals(reranker_server, path, body, words):
    r = post(reranker_server, path, body)
    assert r.status_code in (400, 404) and words in r.json()["error"]["message"], r.text
    assert not reranker_server.engine.engine.requests


def test_an_embedding_server_scores_by_cosine_and_does_not_classify(smol):
    with running_server(smol, num_kv_blocks=64, max_model_len=128) as s:
        r = post(s, "/score", {"text_1": "The capital of France is Paris.", "text_2": "Paris is in France."})
        assert r.status_code == 200, r.text
        e = post(s, "/v1/embeddings", {"input": ["The capital of France is Paris.", "Paris is in France."]}).json()
        a, b = (np.array(d["embedding"]) for d in e["data"])
        assert abs(r.json()["data"][0]["score"] - a @ b) < 1e-5
        r = post(s, "/classify", {"input": "hello"})
        assert r.status_code == 400 and "no classification head" in r.json()["error"]["message"]
