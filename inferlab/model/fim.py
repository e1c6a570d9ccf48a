"""Fill in the middle: a code model's prompt for the text between a prefix and a suffix, as code
completion asks (OpenAI's completions `suffix`, Ollama's /api/generate `suffix`). Such models were
trained on prefix-suffix-middle order with three tokens of their own vocabulary, which name their
family; the answer is the middle. A vocabulary without them cannot be asked."""
from __future__ import annotations

# (prefix, suffix, middle) token texts, each family's as its tokenizer spells them
FAMILIES = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, Qwen3-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, SantaCoder
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
    ("\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>"),  # CodeLlama (SentencePiece)
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama as some GGUFs spell them
    ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"),  # DeepSeek-V2-Coder's GGUF spelling
]


def fim_ids(tok) -> tuple[int, int, int] | None:
    """The vocabulary's (prefix, suffix, middle) token ids, or None where it has no family's three."""
    for family in FAMILIES:
        ids = [tok.backend.token_to_id(t) for t in family]
        if None not in ids:
            return ids[0], ids[1], ids[2]
    return None


def fill_prompt(tok, prefix: str, suffix: str) -> list[int]:
    """The token ids that ask for the middle between `prefix` and `suffix` (with BOS where the
    vocabulary adds one)."""
    ids = fim_ids(tok)
    if ids is None:
        raise ValueError("this model has no fill-in-the-middle tokens (such as <|fim_prefix|>, <|fim_suffix|> and "
                         "<|fim_middle|>), so it cannot complete between a prompt and a suffix: send the prompt "
                         "alone, or serve a code model trained for it")
    pre, suf, mid = ids
    bos = [tok.bos_token_id] if tok.add_bos_token else []
    return [*bos, pre, *tok.encode(prefix, add_special_tokens=False), suf,
            *tok.encode(suffix, add_special_tokens=False), mid]
