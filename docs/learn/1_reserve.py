"""Chapter 1: reserve each request's whole length up front, as engines before vLLM did: most of
the pool sits empty, and the next request crashes with out of KV memory. Then the same requests
with paged blocks.

    .venv/bin/python docs/learn/1_reserve.py
"""
from lesson import QUESTIONS, chat, engine, greedy, options, pool, run, texts

from inferlab.allocation import OutOfKVMemoryError

# 12 blocks of 16 tokens = 192 slots; a request reserves its prompt (about 40 tokens) + 24: 4 blocks
POOL = dict(num_kv_blocks=12, block_size=16)
MAX_TOKENS = 24


def main() -> None:
    a = options(__doc__)
    print(f"== kv_allocation='reserve': every request reserves prompt + max_tokens ({MAX_TOKENS}) when it arrives")
    eng = engine(kv_allocation="reserve", **POOL)
    for letter, question in zip("abcdef", QUESTIONS):
        try:
            eng.add_request(letter, chat(question), greedy(MAX_TOKENS))
        except OutOfKVMemoryError as e:
            print(f"request {letter}: {e}")  # the crash: the engine refuses what its reservations cannot hold
            break
    shown = set()

    def show(step, out):
        if step in (1, 10) and step not in shown:
            shown.add(step)
            held = sum(r.num_computed_tokens for r in eng.scheduler.running)
            reserved = sum(len(r.block_table) for r in eng.scheduler.running) * POOL["block_size"]
            print(f"step {step:2}: {pool(eng)}   {held} tokens held in {reserved} reserved slots "
                  f"({100 * (1 - held / reserved):.0f}% empty)")
    done = run(eng, show, a.record)
    print(f"finished {len(done)} of {len(QUESTIONS)} questions; the rest were refused")

    print("\n== kv_allocation='paged' (vLLM): blocks as tokens arrive, the same pool and questions")
    eng = engine(**POOL)
    for letter, question in zip("abcdef", QUESTIONS):
        eng.add_request(letter, chat(question), greedy(MAX_TOKENS))
    peak = [0.0]

    def track(step, out):
        peak[0] = max(peak[0], eng.block_manager.usage)
        if step in (1, 10):
            print(f"step {step:2}: {pool(eng)}")
    answers = texts(run(eng, track))
    print(f"finished {len(answers)} of {len(QUESTIONS)} questions, peak KV usage {100 * peak[0]:.0f}%, "
          f"{eng.scheduler.num_preemptions} preemptions")
    for letter, text in answers.items():
        print(f"  {letter}: {text[:70]!r}")


if __name__ == "__main__":
    main()
