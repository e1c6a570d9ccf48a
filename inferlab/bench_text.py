"""An input-grounded workload on real text (`inferlab bench --workload edit`): each request asks the
chat model to edit a passage given in its prompt (fix typos, swap a term, restyle it), so most of
the answer copies the prompt. This is where prompt lookup pays off, as it does for code edits,
summaries and retrieval answers. Passages and tasks are fixed, prompts are built with the model's
chat template; requests stop at the end of the answer (EOS), not at a fixed length."""
from __future__ import annotations

PASSAGES = [
    "A paged KV cache splits the keys and values of every request into blocks of sixteen tokens. A "
    "request holds a list of blocks, its block table, and gets a new block only when the last one is "
    "full. Because blocks can lie anywhere in the pool, memory is no longer reserved for tokens that "
    "may never be generated, and many more requests fit in the same memory.",
    "The scheduler runs one loop every step. Each running request asks for the tokens it still has to "
    "compute: one for a decode, a chunk of its prompt for a prefill. Waiting requests are admitted in "
    "the order of the policy while the token budget and the pool allow. When the pool runs out, the "
    "policy chooses a victim, whose blocks are freed and whose tokens are computed again later.",
    "Prefix caching keeps the blocks of finished requests in the pool, each under a key made from its "
    "tokens and the key of the block before it. A new request whose prompt starts with the same tokens "
    "finds those blocks and skips their prefill. Free blocks stay cached until a new allocation needs "
    "them, and the least recently used ones go first.",
    "Speculative decoding guesses a few tokens ahead and checks them all in one step of the large "
    "model. On a CPU, a decode step reads every weight once, so checking five tokens costs little more "
    "than computing one. When the guesses are right, several tokens come out of a single step; when "
    "they are wrong, the step still produces one correct token, so nothing is lost but a little work.",
    "The dashboard draws the block pool as a grid of cells, one per block, coloured by how many "
    "requests share it. Beside it, the queues show which requests are running, waiting or preempted, "
    "and a chart plots the tokens of each step against the budget. Everything it shows comes from a "
    "small snapshot that the engine writes after each step, so watching costs almost nothing.",
    "Quantized weights store each group of thirty-two numbers as small integers with one scale. A "
    "four-bit model is about eight times smaller than the same model in thirty-two-bit floats, and "
    "since a decode step on a CPU is limited by how fast the weights stream from memory, it runs "
    "several times faster. The price is a small change in the next-token probabilities.",
]
TASKS = [
    "Fix any spelling mistakes in the following paragraph and write it out again in full, changing "
    "nothing else.\n\n{}",
    "Rewrite the following paragraph, replacing the word \"request\" with \"query\" everywhere. Output "
    "only the rewritten paragraph.\n\n{}",
    "Copy the following paragraph, then add one sentence at the end that sums it up.\n\n{}",
]


EDIT_MAX_TOKENS = 160


def edit_messages() -> list[str]:
    """Every (task, passage) pair as a user message: 18 of them."""
    return [task.format(passage) for task in TASKS for passage in PASSAGES]


def edit_workload(tokenizer, max_tokens: int = EDIT_MAX_TOKENS) -> dict:
    """Every (task, passage) pair as a chat prompt: 18 requests, greedy, stopping at EOS."""
    requests = []
    for message in edit_messages():
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}])
        requests.append({"prompt_token_ids": tokenizer.encode_chat(text),
                         "max_tokens": max_tokens, "ignore_eos": False})
    return {"name": "edit", "requests": requests}
