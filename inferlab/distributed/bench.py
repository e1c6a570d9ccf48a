"""What tensor parallelism costs, measured (`python -m inferlab.distributed.bench --help`).

- `allreduce`: a gloo all-reduce of one decode step's hidden state, [rows, hidden], between two
  processes of this host: the median of single calls, per row count and dtype;
- `tokens --model DIR`: milliseconds per decode step and per token with one rank and with
  `--tp` ranks, at each `--batch` (every sequence decoding, 16-token prompts), the CPU time a
  step takes in all ranks' processes, and rank 0's time in collectives; one rank is timed as it
  runs and op by op (`enforce_eager`), since several ranks always run op by op;
- `random-model DIR`: a checkpoint with random weights in Qwen2.5-0.5B's shape (24 layers,
  hidden 896, 14 heads, 2 KV heads) but the embedded model's tokenizer and vocabulary, to time a
  size that two ranks divide (its output means nothing).

Each prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _allreduce_rank(rank: int, port: int, hidden: int, rows: list[int], iters: int, out) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=False, timeout=timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=60))
    for dtype in (torch.bfloat16, torch.float32):
        for n in rows:
            x = torch.randn(n, hidden).to(dtype)
            times = []
            for i in range(iters + 20):
                t0 = time.perf_counter()
                pg.allreduce([x]).wait()
                if i >= 20:
                    times.append(time.perf_counter() - t0)
            if rank == 0:
                out.put({"what": "allreduce", "rows": n, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."),
                         "bytes": x.numel() * x.element_size(), "median_us": round(1e6 * statistics.median(times), 1),
                         "p90_us": round(1e6 * sorted(times)[int(0.9 * len(times))], 1)})


def allreduce(hidden: int, rows: list[int], iters: int) -> None:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, port, hidden, rows, iters, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for _ in range(2 * len(rows)):
        print(json.dumps(out.get(timeout=600)), flush=True)
    for p in procs:
        p.join()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux): the work a step costs, whatever share of
    a busy machine the scheduler gave it."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def time_decode(model: str, tp: int, batch: int, steps: int, dtype: str, eager: bool) -> dict:
    from inferlab import LLM, SamplingParams
    llm = LLM(model=model, dtype=dtype, tensor_parallel_size=tp, enforce_eager=eager, max_num_seqs=batch,
              num_kv_blocks=batch * (16 + steps + 8) // 16 + batch)
    engine, rng = llm.engine, random.Random(0)
    try:
        for i in range(batch):
            ids = [rng.randrange(100, engine.model.args.vocab_size) for _ in range(16)]
            engine.add_request(str(i), {"prompt_token_ids": ids}, SamplingParams(max_tokens=steps + 4, ignore_eos=True))
        engine.step()  # every prefill
        engine.step()  # a first decode step
        kinds = ("all_reduce_s", "gather_s", "broadcast_s")
        before = engine.runner.comm_stats() if tp > 1 else dict.fromkeys(kinds, 0.0)
        pids = [os.getpid(), *(p.pid for p in getattr(engine.runner, "procs", {}).values())]
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        for _ in range(steps):
            engine.step()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
        after = engine.runner.comm_stats() if tp > 1 else before
    finally:
        engine.shutdown()
    comm = {f"{k.removesuffix('_s')}_ms_per_step": round(1e3 * (after[k] - before[k]) / steps, 2) for k in kinds}
    return {"what": "tokens", "tp": tp, "batch": batch, "eager": eager or tp > 1,
            "dtype": str(engine.dtype).removeprefix("torch."), "ms_per_step": round(1e3 * seconds / steps, 2),
            "ms_per_token": round(1e3 * seconds / steps / batch, 3), "cpu_ms_per_step": round(1e3 * cpu / steps, 1),
            **comm}


def random_model(path: str) -> None:
    import transformers

    from inferlab.model.loader import load_model
    os.makedirs(path, exist_ok=True)
    tok = load_model(None, "float32", torch.device("cpu"))[1]
    config = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      max_position_embeddings=4096, tie_word_embeddings=True,
                                      eos_token_id=sorted(tok.eos_token_ids)[0])
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tok.backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": tok.eos_token}, f)
    print(json.dumps({"what": "random-model", "path": path}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m inferlab.distributed.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a_ = sub.add_parser("allreduce")
    a_.add_argument("--hidden", type=int, default=896)
    a_.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    a_.add_argument("--iters", type=int, default=200)
    t = sub.add_parser("tokens")
    t.add_argument("--model", required=True)
    t.add_argument("--tp", type=int, default=2)
    t.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    t.add_argument("--steps", type=int, default=16)
    t.add_argument("--dtype", default="auto")
    t.add_argument("--tp-only", action="store_true", help="skip the one-rank runs")
    r = sub.add_parser("random-model")
    r.add_argument("path")
    a = p.parse_args(argv)
    if a.cmd == "allreduce":
        allreduce(a.hidden, a.rows, a.iters)
    elif a.cmd == "random-model":
        random_model(a.path)
    else:
        for batch in a.batch:
            for tp, eager in ((a.tp, True),) if a.tp_only else ((1, False), (1, True), (a.tp, True)):
                print(json.dumps(time_decode(a.model, tp, batch, a.steps, a.dtype, eager)), flush=True)


if __name__ == "__main__":
    main()
