"""A cache of parsed GGUF files. Reading a GGUF file's metadata in Python (the `gguf` package parses
the tokenizer's tens of thousands of strings one by one) takes 5-15 s, most of a cold start. The
parsed result is saved once as safetensors: the model's shape, the tokenizer fields, and every tensor
as the file stores it (quantized blocks stay blocks, with their type's name), so the cache serves any
dtype and any quantization mode, and later starts just read it back.

Entries live under `$INFERLAB_CACHE/models` (default `~/.cache/inferlab`), keyed by the file's path,
size and modification time, so an edited or replaced file is parsed again; saving an entry drops
those of files since deleted and of this file's older versions. `INFERLAB_MODEL_CACHE=0` turns the
cache off.
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

from inferlab.cache_dir import cache_dir
from inferlab.model.base import ModelArgs
from inferlab.model.deepseek import DeepseekArgs
from inferlab.model.layers import quant
from inferlab.model.qwen_moe import QwenMoeArgs
from inferlab.switches import env_switch

log = logging.getLogger("inferlab")
FORMAT = 4  # bump when the saved layout changes (4: a head's fields and pooling type)
ARGS = {cls.__name__: cls for cls in (ModelArgs, QwenMoeArgs, DeepseekArgs)}
Tensors = list[tuple[str, torch.Tensor, quant.WeightType]]


def _entry(path: str, say: bool = True) -> Path | None:
    if not env_switch("INFERLAB_MODEL_CACHE"):
        return None
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{FORMAT}"
    try:
        root = cache_dir("models")
    except OSError as e:  # no home folder and no usable temporary one (a read-only container)
        if say:  # once: by `load`, not again by the `save` after it
            log.warning("no folder to cache the parsed model in (%s): it is parsed at every start", e)
        return None
    return root / hashlib.sha256(os.fsencode(key)).hexdigest()[:20]  # a path's bytes, any locale


def load(path: str) -> tuple[ModelArgs, Tensors, dict] | None:
    """(model args, [(name, tensor as stored, its type)], tokenizer and head fields) if this file was
    parsed before."""
    entry = _entry(path)
    if entry is None:
        return None
    try:
        text = (entry / "meta.json").read_text()
    except (FileNotFoundError, NotADirectoryError):  # not parsed before
        return None
    except PermissionError as e:
        return _unreadable(entry, e)
    try:
        meta = json.loads(text)
        state = load_file(entry / "weights.safetensors")
        tensors = [(name, state[name], quant.BY_NAME[wtype]) for name, wtype in meta["types"]]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["args"].items()}  # JSON has no tuples
        return ARGS[meta["args_class"]](**fields), tensors, meta["tokenizer"]
    except PermissionError as e:
        return _unreadable(entry, e)
    except Exception as e:  # noqa: BLE001 - any damage (truncated file, bad JSON): drop it, parse again
        log.warning("ignoring damaged model cache %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _unreadable(entry: Path, e: OSError) -> None:
    """Another user's entry (a cache filled as root while an image was built, served as a user): parse
    the file, and leave the entry to its owner."""
    log.warning("cannot read the model cache %s (%s): parsing the file", entry, e.strerror)


def save(path: str, args: ModelArgs, tensors: Tensors, tokenizer_fields: dict) -> None:
    entry = _entry(path, say=False)
    if entry is None:
        return
    meta = {"args": dataclasses.asdict(args), "args_class": type(args).__name__, "tokenizer": tokenizer_fields,
            "types": [(name, wtype.name.lower()) for name, _, wtype in tensors]}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # write aside, then rename: a reader never sees half an entry
        with tempfile.TemporaryDirectory(dir=entry.parent, ignore_cleanup_errors=True) as tmp:
            save_file({name: t.contiguous() for name, t, _ in tensors}, os.path.join(tmp, "weights.safetensors"))
            Path(tmp, "meta.json").write_text(json.dumps(meta))
            Path(tmp, "source").write_bytes(os.fsencode(os.path.abspath(path)))  # its bytes: any name, any locale
            for name in ("weights.safetensors", "meta.json", "source"):  # readable by whoever may reach the
                os.chmod(os.path.join(tmp, name), 0o644)  # folder: a cache filled as root, served as a user
            os.chmod(tmp, 0o755)
            os.replace(tmp, entry)
    except OSError as e:
        if os.path.exists(entry / "meta.json"):  # another process parsed the same file meanwhile
            return
        log.warning("could not cache the parsed model in %s: %s", entry, e)
        return
    size = sum(t.numel() * t.element_size() for _, t, _ in tensors)
    log.info("cached the parsed model in %s (%.0f MiB); later starts read it from there", entry, size / 2**20)
    _prune(entry, os.path.abspath(path))


def _prune(saved: Path, source: str) -> None:
    """Drop the entries of files that are gone, and this file's older versions: each entry is a copy
    of a whole model, so a cache only added to grew by every file ever parsed (a downloaded model
    replaced, a test's temporary file)."""
    for entry in saved.parent.iterdir():
        try:
            other = os.fsdecode((entry / "source").read_bytes()) if entry != saved else None
        except OSError:  # not an entry, or one from before sources were written: left as it is
            continue
        if other is not None and (other == source or not os.path.exists(other)):
            shutil.rmtree(entry, ignore_errors=True)
