"""What the four chapter scripts share: the embedded model loaded once, chat prompts as token ids,
a step loop that prints what the scheduler did, and the KV pool drawn as one line of text."""
from __future__ import annotations

import argparse
import functools
import logging

from inferlab import EngineConfig, LLMEngine, SamplingParams
from inferlab.outputs import RequestOutput

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 7?",
             "Why is the sky blue?", "Say hello in Spanish.", "What do bees make?"]


def options(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--record", default=None, metavar="FILE",
                   help="also record the run for the dashboard: `inferlab scope --replay FILE`")
    logging.getLogger("inferlab").setLevel(logging.WARNING)
    a = p.parse_args()
    if a.record is not None:  # before the model loads, as the CLI's --record is checked
        from inferlab.cli_args import output_file
        try:
            output_file(a.record, "--record")
        except ValueError as e:
            p.error(str(e))
    return a


@functools.cache
def model():
    """The embedded SmolLM2-135M-Instruct, loaded once and shared by every engine a script makes. In fp32:
    the answers' lengths drive the scheduling the chapters quote, and bf16 (the default where the CPU has
    bf16 instructions) answers some questions in other words, so its runs preempt other requests at other
    steps."""
    import torch

    from inferlab.model.loader import load_model
    return load_model(None, "float32", torch.device("cpu"))


class StepClock:
    """Time counted in engine steps, so arrival times and policy keys read as small numbers."""

    def __init__(self) -> None:
        self.engine: LLMEngine | None = None

    def __call__(self) -> float:
        return float(self.engine.scheduler.step_count) if self.engine is not None else 0.0


def engine(**knobs) -> LLMEngine:
    clock = StepClock()
    clock.engine = LLMEngine(EngineConfig(**knobs), clock=clock, loaded=model())
    return clock.engine


def chat(question: str) -> dict:
    tok = model()[1]
    return {"prompt_token_ids": tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]),
                                           add_special_tokens=False)}


def greedy(max_tokens: int | None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def pool(eng: LLMEngine) -> str:
    """One character per KV block: a request's letter (upper case: holds K/V already, lower case:
    allocated but still empty), `+` shared by several requests, `.` free, `-` free but still cached.
    Requests are named by one letter each."""
    bm, owner = eng.block_manager, {}
    for req in eng.scheduler.running:
        filled = bm.blocks_needed(req.num_computed_tokens)
        for k, b in enumerate(req.block_table):
            owner[b] = "+" if b in owner else (req.request_id.upper() if k < filled else req.request_id.lower())
    return "".join(owner.get(b.block_id, "-" if b.hash is not None else ".") for b in bm.blocks)


def run(eng: LLMEngine, show=None, record: str | None = None) -> dict[str, RequestOutput]:
    """Step until every request finishes; `show(step, scheduler_output)` prints what it likes.
    Returns each request's final output."""
    from inferlab.cli_args import recording
    done: dict[str, RequestOutput] = {}
    with recording(eng, record):
        while eng.has_unfinished_requests():
            outs = eng.step()
            if show is not None:
                show(eng.scheduler.step_count, eng.scheduler.last_output)
            done.update((o.request_id, o) for o in outs if o.finished)
    return done


def texts(done: dict[str, RequestOutput]) -> dict[str, str]:
    return {rid: o.outputs[0].text for rid, o in sorted(done.items())}
