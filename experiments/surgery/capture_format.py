"""The capture format both engines' recorders write (plain Python: it runs in vLLM's environment too).

A capture is one JSON object: `engine`, `scenario`, `knobs` (the scenario), `num_blocks`,
`block_size`, `outputs` (token ids per request, in trace order), `prefix` ({queries, hits}, vLLM
also {preempted_queries, preempted_hits}), `preemptions`, `too_long_error`, and `steps`, one per
schedule() call:

    t          seconds since the first step
    sched      [[request, tokens this step, tokens computed before it], ...]
    preempted  [request, ...] preempted during this step's scheduling
    free       free blocks after scheduling (cached-but-free included)
    cells      the pool's blocks, run-length encoded: [[state, count], ...], state = ref count,
               0 free, -1 free but cached
    tables     [[request, [[first block, count], ...]], ...]
    prefix     [tokens looked up in the prefix cache so far, of which hits]

`free`, `cells`, `tables` and `prefix` are left out of a step where they equal the step before's
(most decode steps change none of them), which keeps a capture to a few KB.
"""
from __future__ import annotations

CARRIED = ("free", "cells", "tables", "prefix")


def runs(values: list[int], consecutive: bool = True) -> list[list[int]]:
    """[[first, count], ...] over runs of consecutive ids (`consecutive`), or of equal values."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] + (out[-1][1] if consecutive else 0) == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def add_step(steps: list[dict], step: dict) -> None:
    """Append `step`, leaving out what has not changed since the last step that carried it."""
    last = {}
    for s in steps:
        last.update({k: s[k] for k in CARRIED if k in s})
    steps.append({k: v for k, v in step.items() if k not in CARRIED or last.get(k) != v})


def expand(steps: list[dict]) -> list[dict]:
    """The steps with every carried field filled in again."""
    out, last = [], {}
    for s in steps:
        last.update({k: s[k] for k in CARRIED if k in s})
        out.append({**last, **s})
    return out
