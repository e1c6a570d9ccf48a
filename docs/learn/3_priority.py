"""Chapter 3: priority scheduling with preemption, on a heap. Four background requests fill the
engine; then an urgent one arrives. Under FCFS it waits its turn; under `priority` it evicts the
lowest-priority running request at once and its first token comes steps earlier.

    .venv/bin/python docs/learn/3_priority.py
"""
from lesson import QUESTIONS, chat, engine, greedy, options, pool, run

from inferlab.cli_args import recording

POOL = dict(num_kv_blocks=12, block_size=16, max_num_seqs=4)  # room for four requests at a time
URGENT_AT = 4  # the step the urgent request arrives at


def main() -> None:
    a = options(__doc__)
    first_token = {}
    for policy in ("fcfs", "priority"):
        print(f"== scheduling_policy={policy!r}: a, b, c, d at priority 1, then u at priority 0 at step {URGENT_AT}")
        eng = engine(scheduling_policy=policy, **POOL)

        def show(step, out, eng=eng):
            events = [f"preempt {r.request_id}" for r in out.preempted]
            if "u" not in first_token and any(r.request_id == "u" for r, _ in out.scheduled):
                first_token["u"] = step
                events.append("u runs")
            if events:
                print(f"step {step:2}: {pool(eng)}  {', '.join(events)}")
        first_token.clear()
        # recorded from step 1: the background requests filling the pool before u arrives
        with recording(eng, a.record if policy == "priority" else None):
            for letter, question in zip("abcd", QUESTIONS):
                eng.add_request(letter, chat(question), greedy(16), priority=1)
            for _ in range(URGENT_AT):
                eng.step()
            eng.add_request("u", chat(QUESTIONS[4]), greedy(16), priority=0)
            heap = [(eng.scheduler.waiting.key(r), r.request_id) for r in eng.scheduler.waiting]
            print(f"step {URGENT_AT}: {pool(eng)}  waiting heap (key, request): {heap}")
            run(eng, show)
        print(f"u's first token at step {first_token['u']}, {first_token['u'] - URGENT_AT} steps after it arrived\n")


if __name__ == "__main__":
    main()
