"""Chapter 4: prefix caching with a trie. Chats that share a system prompt reuse its KV blocks:
the first request computes them, the next ones find them by walking a radix tree over token
blocks (`prefix_cache="radix"`, as in SGLang) — or by the hash chain vLLM uses (`"hash"`), with
the same hits and the same outputs.

    .venv/bin/python docs/learn/4_prefix.py
"""
from lesson import QUESTIONS, engine, greedy, model, options, run, texts

from inferlab.cli_args import recording

SYSTEM = ("You are a patient teacher for curious children. Answer in one short sentence, with simple "
          "words, and never use lists or numbers written as digits. If a question is ambiguous, answer the "
          "most likely reading of it, and never ask a question back.")


def chat_with_system(question: str) -> dict:
    tok = model()[1]
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    return {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}


def show_tree(eng, depth_limit: int = 6) -> None:
    """The trie: one node per cached block, its label the block's tokens (shown as text)."""
    tok = model()[1]

    def walk(node, depth):
        for child in node.children.values():
            text = tok.decode(list(child.tokens), skip_special_tokens=True).replace("\n", "⏎")
            more = f"  ({len(child.children)} children)" if len(child.children) > 1 else ""
            print(f"  {'  ' * depth}block {child.block_id:2} {text[:40]!r}{more}")
            if depth + 1 < depth_limit:
                walk(child, depth + 1)
    for root in eng.block_manager.roots.values():  # one root per model and cache salt
        walk(root, 0)


def main() -> None:
    a = options(__doc__)
    results = {}
    for structure in ("radix", "hash"):
        eng = engine(prefix_cache=structure, num_kv_blocks=64, block_size=16)
        # one recording of both runs: b, c and d finding a's blocks is what there is to watch
        with recording(eng, a.record if structure == "radix" else None):
            eng.add_request("a", chat_with_system(QUESTIONS[0]), greedy(16))
            done = run(eng)
            for letter, question in zip("bcd", QUESTIONS[1:4]):  # after a: they find its blocks cached
                eng.add_request(letter, chat_with_system(question), greedy(16))
            done.update(run(eng))
        bm = eng.block_manager
        print(f"== prefix_cache={structure!r}: {bm.prefix_hits} of {bm.prefix_queries} prompt tokens from the cache")
        print("   " + ", ".join(f"{rid}: {o.num_cached_tokens} of {len(o.prompt_token_ids)} cached"
                                for rid, o in sorted(done.items())))
        if structure == "radix":
            print("the tree after the four requests (system prompt first, then each question's own blocks):")
            show_tree(eng)
        results[structure] = (texts(done), bm.prefix_hits, sorted(b.hash for b in bm.blocks if b.hash is not None))
    print(f"\nsame outputs: {results['radix'][0] == results['hash'][0]}, same hits: "
          f"{results['radix'][1] == results['hash'][1]}, the tree's node names are the chain hashes: "
          f"{results['radix'][2] == results['hash'][2]}")


if __name__ == "__main__":
    main()
