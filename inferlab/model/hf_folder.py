"""An HF model folder's files: config.json, and the safetensors files that are the checkpoint, read
tensor by tensor as stored."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

from inferlab.model.base import ModelLoadError


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path} has no config.json")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None


def sentence_transformers_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers folder's modules.json gives its Pooling module: "LAST",
    "MEAN", "CLS", another mode's name, or None where it has none."""
    try:
        with open(os.path.join(path, "modules.json")) as f:
            modules = json.load(f)
        where = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("models.Pooling"))
        with open(os.path.join(path, where, "config.json")) as f:
            modes = [k for k, on in json.load(f).items() if k.startswith("pooling_mode_") and on is True]
    except (OSError, ValueError, TypeError, AttributeError, StopIteration):
        return None
    names = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}
    return names.get(modes[0], modes[0].removeprefix("pooling_mode_")) if len(modes) == 1 else None


def checkpoint_files(path: str) -> list[str]:
    """A folder's safetensors files as transformers and vLLM choose them: those its index names
    (model.safetensors.index.json), else model*.safetensors, else every *.safetensors. (Mistral's
    folders also hold consolidated.safetensors: the same weights under Mistral's own names.)"""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is no index of safetensors files: {type(e).__name__}: {e}") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ModelLoadError(f"{path} lacks {', '.join(missing)}, which its model.safetensors.index.json names")
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "model*.safetensors"))) or \
        sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    return files


def weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor, None]]:
    """(name, tensor, no block type) of every tensor in `files`, one at a time."""
    from safetensors import safe_open
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), None
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot read {os.path.basename(file)}: {e}") from None


def causal_lm_names(tensors: Iterator[tuple[str, torch.Tensor, None]]) -> Iterator[tuple[str, torch.Tensor, None]]:
    """A bare decoder's tensors (transformers' AutoModel saves; Qwen3-Embedding's checkpoint, though its
    config lists Qwen3ForCausalLM) under the names a causal LM's checkpoint gives them: `model.` first."""
    for name, tensor, wtype in tensors:
        yield ("model." + name if name.startswith(("embed_tokens.", "layers.", "norm.")) else name), tensor, wtype
