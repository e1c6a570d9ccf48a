"""A GGUF file's vocabulary as a `tokenizers` backend, as llama.cpp reads it: byte-level BPE
(`tokenizer.ggml.model` "gpt2": SmolLM, Llama 3, Qwen) or SentencePiece ("llama": Llama 2,
Mistral 7B, TinyLlama, Vicuna). The file holds the tokens, their types and either merges (BPE) or a
score per token (SentencePiece); the rest of each tokenizer is the format's own rule, written here."""
from __future__ import annotations

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from inferlab.model import pretokenize

SPACE = "\u2581"  # SentencePiece writes a space as "▁" inside its tokens
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # tokenizer.ggml.token_type's values


def backend(fields: dict) -> tuple[HFTokenizer, bool]:
    """The tokenizer of a GGUF's `tokenizer.*` fields, and whether its vocabulary adds BOS by
    default (SentencePiece's does, where the file has no tokenizer.ggml.add_bos_token)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise ValueError(f"GGUF tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' and "
                         "SentencePiece 'llama' are)")
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"the GGUF has {len(types)} token types for {len(tokens)} tokens")
    for key in ("bos", "eos", "eot", "unknown"):
        at = fields.get(f"tokenizer.ggml.{key}_token_id")
        if at is not None and not 0 <= at < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id {at} is outside the vocabulary "
                             f"of {len(tokens)} tokens")
    tokenizer, add_bos = BUILDERS[kind](tokens, fields)
    # control (and unknown) tokens are special, user-defined ones added: both match whole, never split
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty in (UNKNOWN, CONTROL)])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return tokenizer, bool(fields.get("tokenizer.ggml.add_bos_token", add_bos))


def _byte_level(tokens: list[str], fields: dict) -> tuple[HFTokenizer, bool]:
    """GPT-2's byte-level BPE: every byte is a printable character, the merges are listed, and
    the text is cut into words first as its `tokenizer.ggml.pre` name says."""
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError("the GGUF file has no tokenizer.ggml.merges: the vocabulary must be in the file")
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    split = pretokenize.for_gguf(fields.get("tokenizer.ggml.pre"))
    tokenizer = _bpe({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, ignore_merges=split.ignore_merges)
    tokenizer.pre_tokenizer = split.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, split.add_bos


def _sentencepiece(tokens: list[str], fields: dict) -> tuple[HFTokenizer, bool]:
    """SentencePiece's BPE as llama.cpp runs it: spaces become "▁", a "▁" goes before the text and
    before each piece of it after a special token (`add_space_prefix`, on unless the file says
    otherwise), and adjacent symbols merge highest-scoring result first. That is BPE whose merges
    are every split of a token into two tokens, ranked by the token's score. A character outside
    the vocabulary becomes its UTF-8 bytes' <0xXX> tokens."""
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("a SentencePiece GGUF needs a score per token (tokenizer.ggml.scores)")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = fields.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_by_score(tokens, scores, vocab)
    unk = fields.get("tokenizer.ggml.unknown_token_id", 0 if tokens else None)
    tokenizer = _bpe(vocab, merges, unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                     byte_fallback=True)
    prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    # a normalizer, not Metaspace: it prepends "▁" to text already starting with a space, as SentencePiece does
    tokenizer.normalizer = normalizers.Sequence([*([normalizers.Prepend(SPACE)] if prefix else []),
                                                 normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer, True


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]], **options) -> HFTokenizer:
    try:
        return HFTokenizer(models.BPE(vocab, merges, **options))
    except Exception as e:  # noqa: BLE001 - the tokenizers library's own error type
        raise ValueError(f"the GGUF vocabulary does not hold together: {e}") from None


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked = [(-scores[i], i, cut, t[:cut], t[cut:]) for i, t in enumerate(tokens)
              for cut in range(1, len(t)) if t[:cut] in vocab and t[cut:] in vocab]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}
