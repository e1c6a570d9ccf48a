"""A cache of converted GGUF models. Reading a GGUF file means parsing its metadata in Python and
dequantizing every tensor: most of a cold start. The result, in the engine's dtype, is saved once as
safetensors with the model's shape and tokenizer fields, and later starts just read it back.

Entries live under `$INFERLAB_CACHE/models` (default `~/.cache/inferlab`), keyed by the file's path,
size, modification time and the dtype, so an edited or replaced file is converted again.
`INFERLAB_MODEL_CACHE=0` turns the cache off.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inferlab.model.llama import LlamaForCausalLM, ModelArgs

log = logging.getLogger("inferlab")
FORMAT = 1  # bump when the saved layout changes


def _entry(path: str, dtype: torch.dtype) -> Path | None:
    if os.environ.get("INFERLAB_MODEL_CACHE", "1") == "0":
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{FORMAT}"
    root = Path(os.environ.get("INFERLAB_CACHE", Path.home() / ".cache" / "inferlab")) / "models"
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


def load(path: str, dtype: torch.dtype) -> tuple[ModelArgs, dict[str, torch.Tensor], dict] | None:
    """(model args, state dict on CPU, tokenizer fields) if this file was converted before."""
    entry = _entry(path, dtype)
    if entry is None or not (entry / "meta.json").exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        return ModelArgs(**meta["args"]), load_file(entry / "weights.safetensors"), meta["tokenizer"]
    except Exception as e:  # noqa: BLE001 - any damage (truncated file, bad JSON): drop it, convert again
        log.warning("ignoring damaged model cache %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def save(path: str, dtype: torch.dtype, model: LlamaForCausalLM, tokenizer_fields: dict) -> None:
    entry = _entry(path, dtype)
    if entry is None:
        return
    state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.args.tie_word_embeddings and k == "lm_head.weight")}  # tied: stored once
    meta = {"args": dataclasses.asdict(model.args), "tokenizer": tokenizer_fields}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # write aside, then rename: a reader never sees half an entry
        with tempfile.TemporaryDirectory(dir=entry.parent, ignore_cleanup_errors=True) as tmp:
            save_file(state, os.path.join(tmp, "weights.safetensors"))
            Path(tmp, "meta.json").write_text(json.dumps(meta))
            os.replace(tmp, entry)
    except OSError as e:
        if (entry / "meta.json").exists():  # another process converted the same file meanwhile
            return
        log.warning("could not cache the converted model in %s: %s", entry, e)
        return
    size = sum(v.numel() * v.element_size() for v in state.values())
    log.info("cached the converted model in %s (%.0f MiB); later starts read it from there", entry, size / 2**20)
