"""What the experiment scripts share: their options, the embedded model, replaying a trace on the
real engine in real time, statistics over finished requests, and writing a table and a plot."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from inferlab.config import EngineConfig  # noqa: E402
from inferlab.engine import LLMEngine  # noqa: E402
from inferlab.sampling_params import SamplingParams  # noqa: E402
from inferlab.sim.replica import Record  # noqa: E402
from inferlab.sim.trace import TraceRequest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE = "--smoke" in sys.argv


def parse_args(doc: str | None, add_options=None) -> argparse.Namespace:
    """The options every script takes; `add_options(parser)` adds a script's own."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if add_options is not None:
        add_options(p)
    p.add_argument("--smoke", action="store_true", help="a small, fast version (what CI runs)")
    p.add_argument("--out", default=None, help="folder for <name>.md and <name>.png "
                   "(default: experiments/results, or a temporary folder for --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    a.out = a.out or (str(Path(tempfile.gettempdir(), "inferlab-experiments-smoke")) if a.smoke else str(RESULTS))
    if a.threads or a.smoke:
        import torch
        torch.set_num_threads(a.threads or 1)  # a smoke run's tiny model gains nothing from more
    try:  # before any model loads or run starts: a folder that cannot be made was a traceback
        Path(a.out).mkdir(parents=True, exist_ok=True)
        if not os.access(a.out, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        p.error(f"--out {a.out}: cannot write there ({e.strerror or e})")
    logging.getLogger("inferlab").setLevel(logging.WARNING)  # the KV-pool line per engine is noise here
    return a


@functools.lru_cache(maxsize=1)
def embedded_model():
    """The embedded SmolLM2-135M (float32, CPU), loaded once and shared read-only by engines; in a
    smoke run a tiny random Llama with the same tokenizer instead, so that CI checks the scripts'
    every path in seconds (its figures mean nothing)."""
    import torch

    from inferlab.model.loader import embedded_model_path, load_model
    if not SMOKE:
        return load_model(None, "float32", torch.device("cpu"))
    from inferlab.model.gguf_reader import GGUFFile
    from inferlab.model.llama import LlamaForCausalLM, ModelArgs
    from inferlab.model.tokenizer import Tokenizer
    fields = GGUFFile(embedded_model_path()).fields
    tokenizer = Tokenizer.from_gguf_fields(fields)
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelArgs(arch="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       head_dim=16, intermediate_size=64, vocab_size=tokenizer.vocab_size,
                                       max_position=8192, tie_word_embeddings=True)).eval()
    return model, tokenizer


def engine(**config) -> LLMEngine:
    import torch
    # a fixed thread count: an engine that adapts to the machine's load would change its step costs mid-run
    config.setdefault("num_threads", torch.get_num_threads())
    return LLMEngine(EngineConfig(**config), loaded=embedded_model())


def token_ids(trace: list[TraceRequest], seed: int = 0) -> list[list[int]]:
    """Real prompts for a trace: random in-vocabulary ids, the same ids for the same shared prefix."""
    rng = random.Random(seed)
    prefixes: dict[int, list[int]] = {}
    prompts = []
    for t in trace:
        head: list[int] = []
        if t.prefix_id is not None:
            head = prefixes.setdefault(t.prefix_id, [rng.randint(100, 10000) for _ in range(t.prefix_len)])
            head = head[:t.prompt_len]
        prompts.append(head + [rng.randint(100, 10000) for _ in range(t.prompt_len - len(head))])
    return prompts


def replay(eng: LLMEngine, trace: list[TraceRequest], prompts: list[list[int]] | None = None,
           token_times: dict[int, list[float]] | None = None) -> tuple[list[Record], float]:
    """Feed `trace` into the engine at its arrival times (wall clock) and step until all finish;
    returns the simulator's record tuples and the makespan. Each request generates exactly its
    output length (ignore_eos). `token_times`, if given, collects each request's token times."""
    prompts = prompts or token_ids(trace)
    start = eng.clock()
    records: list[Record] = []
    i = 0
    while i < len(trace) or eng.has_unfinished_requests():
        now = eng.clock() - start
        while i < len(trace) and trace[i].arrival <= now:
            t = trace[i]
            eng.add_request(str(i), {"prompt_token_ids": prompts[i]}, priority=t.priority,
                            params=SamplingParams(temperature=0, max_tokens=t.output_len, ignore_eos=True),
                            arrival_time=start + t.arrival)
            i += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, trace[i].arrival - now))
            continue
        for out in eng.step():
            if token_times is not None and out.outputs[0].new_token_ids:
                token_times.setdefault(int(out.request_id), []).append(eng.clock() - start)
            if out.finished:
                m = out.metrics
                records.append((int(out.request_id), m.arrival_time - start, m.first_scheduled_time - start,
                                m.first_token_time - start, m.finished_time - start, len(out.outputs[0].token_ids)))
    return records, eng.clock() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else 0.0


def stats(records: list[Record], makespan: float) -> dict:
    """Latency percentiles (seconds) and output throughput over finished-request records."""
    ttft = [first - arr for _, arr, _, first, _, _ in records]
    e2e = [fin - arr for _, arr, _, _, fin, _ in records]
    queue = [sched - arr for _, arr, sched, _, _, _ in records]
    out = {"requests": len(records), "output_tok_s": sum(r[5] for r in records) / makespan if makespan else 0.0}
    for name, values in (("ttft", ttft), ("e2e", e2e), ("queue", queue)):
        out[f"{name}_mean"] = sum(values) / len(values) if values else 0.0
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = pct(values, q)
    out["queue_max"] = max(queue, default=0.0)
    return out


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 1000 else (f"{v:,.0f}" if isinstance(v, float)
                                                                            else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write(out: str, name: str, title: str, sections: list[str], fig=None) -> None:
    """experiments/results/<name>.md (title, then tables and sentences) and <name>.png."""
    head = f"# {title}\n\n" + ("*Smoke run: a tiny random model and small sizes; the figures mean nothing.*\n\n"
                                 if SMOKE else "")
    import torch
    conditions = (f"*Run on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
                  f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows the real engine).*")
    Path(out, f"{name}.md").write_text(head + "\n\n".join([*sections, conditions]) + "\n")
    if fig is not None:
        fig.tight_layout()
        fig.savefig(Path(out, f"{name}.png"), dpi=110)
        plt.close(fig)
    print(f"wrote {Path(out, name)}.md" + (" and .png" if fig is not None else ""), file=sys.stderr)


def figure(ncols: int = 1, width: float = 5.0):
    return plt.subplots(1, ncols, figsize=(width * ncols, 3.6), squeeze=False)
