"""Chapter 2: paged blocks, and preemption when they run out. No crash: when a running request
needs a block and none is free, the newest request is preempted, its KV dropped and recomputed
later (vLLM v1), or copied to a host pool and back (vLLM v0's swap). The outputs are the same.

    .venv/bin/python docs/learn/2_paging.py
"""
from lesson import QUESTIONS, chat, engine, greedy, options, pool, run, texts

POOL = dict(num_kv_blocks=10, block_size=16)  # 160 slots for six requests of about 40 + 24 tokens


def main() -> None:
    a = options(__doc__)
    results = {}
    for mode in ("recompute", "swap"):
        print(f"== preemption_mode={mode!r}, a pool of {POOL['num_kv_blocks']} blocks")
        eng = engine(preemption_mode=mode, **POOL)
        for letter, question in zip("abcdef", QUESTIONS):
            eng.add_request(letter, chat(question), greedy(24))

        def show(step, out, eng=eng):
            events = [f"preempt {r.request_id}" for r in out.preempted]
            if out.swap_out:
                events.append(f"{len(out.swap_out)} blocks copied to the host")
            if out.swap_in:
                events.append(f"{len(out.swap_in)} blocks copied back")
            if events or step == 1:
                print(f"step {step:2}: {pool(eng)}  {', '.join(events)}")
        results[mode] = texts(run(eng, show, a.record if mode == "recompute" else None))
        snap = eng.snapshot(detail=True)  # the cached-block count needs a pass over the pool
        print(f"finished {len(results[mode])} requests, {eng.scheduler.num_preemptions} preemptions, "
              f"{eng.num_prompt_tokens} prompt tokens computed, {snap.get('swapped_out', 0)} blocks swapped out; "
              f"pool at the end: {pool(eng)} ({snap['kv']['cached_free']} blocks still cached)\n")
    same = results["recompute"] == results["swap"]
    print(f"outputs identical under recompute and swap: {same}")
    for letter, text in results["swap"].items():
        print(f"  {letter}: {text[:70]!r}")


if __name__ == "__main__":
    main()
