"""How a GGUF's byte-level BPE vocabulary splits text before its merges: by the `tokenizer.ggml.pre`
name the file carries. The merges were learned on pieces cut by one regular expression, so another
one gives other tokens for the same text (GPT-2's keeps "\\n\\n" apart where Qwen2's and Llama 3's
have one token, and groups digits that Qwen2 takes one at a time). The expressions are the models'
own, as their tokenizer.json files and llama.cpp write them."""
from __future__ import annotations

import logging

from tokenizers import Regex, pre_tokenizers

log = logging.getLogger("inferlab")

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TAIL = r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # line breaks, then runs of spaces (the last one's kept for the next word)
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
QWEN35 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*" + _TAIL
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"), LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), QWEN2),
    "qwen35": QWEN35,
    "tekken": TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4"), GPT4O),
}
GPT2_LIKE = ("default", "gpt-2", "gpt2", "smollm")  # GPT-2's own expression (ByteLevel's built-in one)


def for_gguf(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of a `tokenizer.ggml.pre` name (None: GPT-2's, as llama.cpp's default)."""
    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre is not None and pre not in GPT2_LIKE:
        log.warning("GGUF pre-tokenizer %r is not known here: text is split as GPT-2 splits it, so some "
                    "prompts may get other tokens than the model's own tokenizer gives", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
