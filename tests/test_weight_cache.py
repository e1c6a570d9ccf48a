"""The parsed-GGUF cache: a second load reads the cache instead of the file and gives the same model
and tokenizer, for any dtype and quantization mode; a changed file or a damaged entry is parsed again."""
from __future__ import annotations

import shutil

import pytest
import torch

from inferlab.model import gguf_file, loader, weight_cache
from inferlab.model.layers import quant


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(loader.embedded_model_path(), path)
    return str(path)


def _no_parsing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a cached model must not be parsed again")
    monkeypatch.setattr(gguf_file, "parse", refuse)


def test_second_load_comes_from_the_cache(gguf_copy, monkeypatch):
    first, tok1 = loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    assert weight_cache.load(gguf_copy) is not None
    _no_parsing(monkeypatch)
    second, tok2 = loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    assert second.args == first.args
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    text = "What is the capital of France?"
    assert tok2.encode(text) == tok1.encode(text)
    assert tok2.chat_template == tok1.chat_template and tok2.eos_token_ids == tok1.eos_token_ids
    # the entry holds the file's tensors as stored: any dtype and quantization mode load from it
    dense, _ = loader.load_model(gguf_copy, "bfloat16", torch.device("cpu"), quantization="none")
    assert dense.lm_head.wtype in (quant.BF16, quant.BF16X16)  # bf16 (in pair rows on AVX512-BF16 without AMX)


def test_changed_file_misses(gguf_copy):
    loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    with open(gguf_copy, "ab") as f:  # same path, new content
        f.write(b"\0")
    assert weight_cache.load(gguf_copy) is None


def test_damaged_entry_is_parsed_again(gguf_copy, caplog):
    loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    (weight_cache._entry(gguf_copy) / "weights.safetensors").write_bytes(b"garbage")
    model, _ = loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    assert "damaged model cache" in caplog.text
    assert model.lm_head.weight.abs().sum() > 0
    assert weight_cache.load(gguf_copy) is not None, "the entry is written afresh"


def test_saving_an_entry_drops_those_of_deleted_files_and_older_versions(tmp_path, monkeypatch):
    """Each entry copies a whole model: one per file ever parsed (6.9 GB of test files on one machine)."""
    from inferlab.model.base import ModelArgs
    monkeypatch.setenv("INFERLAB_CACHE", str(tmp_path / "cache"))
    args = ModelArgs("llama", 32, 1, 2, 1, 16, 64, 100, 128)
    tensors = [("w", torch.zeros(4, 32), quant.F32)]
    gone, kept, edited = (tmp_path / name for name in ("gone.gguf", "kept.gguf", "edited.gguf"))
    for f in (gone, kept, edited):
        f.write_bytes(b"v1")
        weight_cache.save(str(f), args, tensors, {})
    old_edit = weight_cache._entry(str(edited))
    gone.unlink()
    edited.write_bytes(b"v2, longer")  # another size: another key
    weight_cache.save(str(edited), args, tensors, {})
    entries = {p.name for p in (tmp_path / "cache" / "models").iterdir()}
    assert entries == {weight_cache._entry(str(kept)).name, weight_cache._entry(str(edited)).name}
    assert old_edit.name not in entries and weight_cache.load(str(kept)) is not None


def test_another_users_entry_is_left_alone_and_the_file_parsed(gguf_copy, monkeypatch, caplog):
    """A cache filled as root while an image was built, then served as a user: the entries could not
    be read, and every start failed with a PermissionError instead of parsing the file."""
    import os
    import stat
    loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    entry = weight_cache._entry(gguf_copy)
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o755  # readable by whoever may reach the folder
    assert {stat.S_IMODE(os.stat(f).st_mode) for f in entry.iterdir()} == {0o644}
    real = weight_cache.Path.read_text

    def denied(self, *a, **k):
        if self.name == "meta.json":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)
    monkeypatch.setattr(weight_cache.Path, "read_text", denied)
    model, _ = loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    assert "cannot read the model cache" in caplog.text and "Permission denied" in caplog.text
    assert model.lm_head.weight.abs().sum() > 0
    assert (entry / "weights.safetensors").exists()  # not deleted as if damaged


def test_no_folder_for_the_cache_parses_at_every_start(gguf_copy, monkeypatch, caplog):
    """A read-only container with no home and no writable /tmp: the model would not load at all."""
    def nowhere(kind):
        raise FileNotFoundError(2, "No usable temporary directory found")
    monkeypatch.setattr(weight_cache, "cache_dir", nowhere)
    model, _ = loader.load_model(gguf_copy, "float32", torch.device("cpu"))
    assert "no folder to cache the parsed model in" in caplog.text
    assert model.lm_head.weight.abs().sum() > 0
