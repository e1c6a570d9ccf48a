"""The converted-GGUF cache: a second load reads the cache and gives the same model and tokenizer."""
from __future__ import annotations

import shutil

import pytest
import torch

from inferlab.model import loader, weight_cache


@pytest.fixture
def gguf_copy(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copy(loader.embedded_model_path(), path)
    return str(path)


def test_second_load_comes_from_the_cache(gguf_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    first, tok1 = loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"))
    assert weight_cache.load(gguf_copy, torch.bfloat16) is not None

    def no_dequantize(*a, **k):
        raise AssertionError("a cached model must not be dequantized again")

    import gguf
    monkeypatch.setattr(gguf, "dequantize", no_dequantize)
    second, tok2 = loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"))
    assert second.args == first.args
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    text = "What is the capital of France?"
    assert tok2.encode(text) == tok1.encode(text)
    assert tok2.chat_template == tok1.chat_template and tok2.eos_token_ids == tok1.eos_token_ids


def test_changed_file_or_dtype_misses(gguf_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"))
    assert weight_cache.load(gguf_copy, torch.float32) is None
    with open(gguf_copy, "ab") as f:  # same path, new content
        f.write(b"\0")
    assert weight_cache.load(gguf_copy, torch.bfloat16) is None


def test_damaged_entry_is_converted_again(gguf_copy, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"))
    (weight_cache._entry(gguf_copy, torch.bfloat16) / "weights.safetensors").write_bytes(b"garbage")
    model, _ = loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"))
    assert "damaged model cache" in caplog.text
    assert model.lm_head.weight.abs().sum() > 0
    assert weight_cache.load(gguf_copy, torch.bfloat16) is not None, "the entry is written afresh"
