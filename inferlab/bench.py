"""Offline throughput benchmark on the reference workloads (random token-id prompts, per-request
max_tokens, ignore_eos). The built-in workloads are generated exactly as the shared
`bench/workload.py` does, so figures compare across engines."""
from __future__ import annotations

import json
import os
import random
import time

from inferlab.llm import LLM
from inferlab.outputs import check_outputs
from inferlab.sampling_params import SamplingParams

SHAPES = {  # name: (num_seqs, max_input_len, max_output_len)
    "small": (16, 256, 64),
    "cpu": (64, 512, 256),
    "nano": (256, 1024, 1024),
}


def make_workload(name: str) -> dict:
    num_seqs, max_in, max_out = SHAPES[name]
    rng = random.Random(0)
    requests = []
    for _ in range(num_seqs):
        n_in = rng.randint(100, max_in)
        requests.append({
            "prompt_token_ids": [rng.randint(0, 10000) for _ in range(n_in)],
            "max_tokens": rng.randint(100, max_out) if max_out > 100 else max_out,
        })
    return {"name": name, "requests": requests}


def load_workload(name_or_path: str, tokenizer=None) -> dict:
    """A built-in workload by name (the random-token SHAPES, or `edit`: real text, which needs the
    tokenizer), or a JSON file."""
    if name_or_path in SHAPES:
        return make_workload(name_or_path)
    if name_or_path == "edit":
        from inferlab.bench_text import edit_workload
        return edit_workload(tokenizer)
    if not os.path.exists(name_or_path):
        raise ValueError(f"unknown workload {name_or_path!r}: use {', '.join(SHAPES)}, edit or a JSON file")
    try:
        with open(name_or_path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read workload {name_or_path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list) or not data["requests"]:
        raise ValueError(f"{name_or_path}: expected {{'requests': [{{'prompt_token_ids': [...], 'max_tokens': N}}, "
                         "...]}, at least one")
    for i, request in enumerate(data["requests"]):
        if problem := request_problem(request):
            raise ValueError(f"{name_or_path}: request {i}: {problem}")
    return data


def request_problem(r: object) -> str | None:
    """What keeps a workload file's entry from running, or None (checked before the model loads)."""
    if not isinstance(r, dict):
        return f"expected an object, got {type(r).__name__}"
    ids = r.get("prompt_token_ids")
    if not (isinstance(ids, list) and ids and all(type(t) is int and t >= 0 for t in ids)):
        return "prompt_token_ids must be a non-empty list of token ids (integers >= 0)"
    if not (type(r.get("max_tokens")) is int and r["max_tokens"] >= 1):
        return f"max_tokens must be an integer >= 1, got {r.get('max_tokens')!r}"
    if not isinstance(r.get("ignore_eos", True), bool):
        return f"ignore_eos must be true or false, got {r['ignore_eos']!r}"
    return None


def run_bench(llm: LLM, workload: dict, use_tqdm: bool = True) -> dict:
    reqs = workload["requests"]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=r.get("ignore_eos", True))
              for r in reqs]
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    llm.engine.block_manager.reset_prefix_cache()
    start = time.perf_counter()
    outputs = check_outputs(llm.generate(prompts, params, use_tqdm=use_tqdm))  # else the figures are wrong
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"workload": workload.get("name", "file"), "requests": len(reqs), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "seconds": round(seconds, 3),
            "output_tok_s": round(output_tokens / seconds, 2),
            "total_tok_s": round((prompt_tokens + output_tokens) / seconds, 2), **spec_stats(llm)}


def spec_stats(llm: LLM) -> dict:
    """Speculative decoding's acceptance over the run, when it is on."""
    spec = llm.engine.snapshot().get("spec_decode")
    if spec is None:
        return {}
    return {"spec_decode": {k: spec[k] for k in ("method", "k", "num_drafts", "num_draft_tokens",
                                                 "num_accepted_tokens", "acceptance_rate", "mean_accepted_length")}}


def run_hf(workload: dict, dtype: str, model_path: str | None = None, mode: str = "static",
           batch: int = 16) -> dict:
    """The same workload through HF transformers `generate` (the baseline every engine is compared
    with): `static` runs fixed batches of `batch` requests in order, left-padded, each batch
    generating its longest max_tokens; `sequential` runs one request at a time. Only each
    request's own max_tokens count as output. Needs `transformers` and `accelerate`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ValueError(f"--compare hf needs transformers and accelerate installed ({e})") from None
    from inferlab.model.loader import embedded_model_path

    path = model_path or embedded_model_path()
    folder, name = (os.path.split(path) if path.endswith(".gguf") else (path, None))
    kwargs = {"gguf_file": name} if name else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    size = 1 if mode == "sequential" else batch

    def generate(reqs: list[dict], new_tokens: int) -> None:
        width = max(len(r["prompt_token_ids"]) for r in reqs)
        ids = torch.full((len(reqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(reqs):  # left padding, so every row's last token is a real one
            ids[i, width - len(r["prompt_token_ids"]):] = torch.tensor(r["prompt_token_ids"])
            mask[i, width - len(r["prompt_token_ids"]):] = 1
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=pad)

    reqs = workload["requests"]
    with torch.inference_mode():
        generate(reqs[:size], 4)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(reqs), size):
            chunk = reqs[i:i + size]
            generate(chunk, max(r["max_tokens"] for r in chunk))
        seconds = time.perf_counter() - start
    output_tokens = sum(r["max_tokens"] for r in reqs)
    return {"engine": "hf-transformers", "mode": mode, "batch": size, "dtype": dtype, "seconds": round(seconds, 3),
            "output_tokens": output_tokens, "output_tok_s": round(output_tokens / seconds, 2)}


def run_latency(llm: LLM, input_len: int = 128, output_len: int = 128, repeats: int = 3) -> dict:
    """One request alone, like llama.cpp's `llama-bench -p 128 -n 128`: time to first token (the
    prefill, all its steps where the prompt is longer than a step's budget) and time per output token
    after it, the best of `repeats` runs."""
    engine = llm.engine
    if input_len + output_len > engine.max_request_tokens:  # it was capped, and the figure named the length asked
        raise ValueError(f"--input-len {input_len} + --output-len {output_len} is more than the "
                         f"{engine.max_request_tokens} tokens a request may hold here (--max-model-len, or the "
                         "KV pool)")
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randint(0, 10000) for _ in range(input_len)]}
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    best_ttft = best_tpot = float("inf")
    for i in range(repeats):
        engine.block_manager.reset_prefix_cache()
        engine.add_request(f"latency-{i}", prompt, params)
        start, before = time.perf_counter(), engine.num_generation_tokens
        while engine.num_generation_tokens == before and engine.has_unfinished_requests():
            check_outputs(engine.step())  # a long prompt's chunks: the first token comes with the last
        first, generated = time.perf_counter(), engine.num_generation_tokens
        while engine.has_unfinished_requests():
            check_outputs(engine.step())
        best_ttft = min(best_ttft, first - start)
        # per token, not per step: a speculative step can emit several
        tokens = engine.num_generation_tokens - generated
        best_tpot = min(best_tpot, (time.perf_counter() - first) / max(tokens, 1))
    return {"input_len": input_len, "output_len": output_len, "ttft_ms": round(best_ttft * 1000, 2),
            "tpot_ms": round(best_tpot * 1000, 2), "decode_tok_s": round(1 / best_tpot, 1),
            "prefill_tok_s": round(input_len / best_ttft, 1), **spec_stats(llm)}
