"""The model both engines load in the surgery room: the embedded SmolLM2 GGUF dequantized to
float32 by transformers into an HF folder (benchmarks/vllm_cpu.py's converter: vLLM's own GGUF
path wants a tokenizer from the hub). InferLab loads this folder too, never the GGUF, so the two
run the very same float32 weights. Prints the folder's path.

    .venv/bin/python experiments/surgery/model_folder.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def model_folder() -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vllm_cpu import hf_folder

    from inferlab.model.loader import embedded_model_path
    folder = hf_folder(embedded_model_path(), "float32")
    config = Path(folder, "config.json")
    cfg = json.loads(config.read_text())
    if not cfg.get("architectures"):  # the converter saves the config alone; a checkpoint names its class
        cfg["architectures"] = ["LlamaForCausalLM"]
        config.write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


if __name__ == "__main__":
    print(model_folder())
