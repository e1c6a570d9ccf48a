"""A GGUF file's vocabulary as a `tokenizers` backend, as llama.cpp reads it: byte-level BPE
(`tokenizer.ggml.model` "gpt2": SmolLM, Llama 3, Qwen) or SentencePiece ("llama": Llama 2,
Mistral 7B, TinyLlama, Vicuna). The file holds the tokens, their types and either merges (BPE) or a
score per token (SentencePiece); the rest of each tokenizer is the format's own rule, written here."""
from __future__ import annotations

import dataclasses
import logging

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from inferlab.model import pretokenize

log = logging.getLogger("inferlab")
SPACE = "\u2581"  # SentencePiece writes a space as "▁" inside its tokens
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # tokenizer.ggml.token_type's values
# tokens that end a turn or a text wherever a vocabulary has them, as llama.cpp finds them by their
# text (files name one eos, while a ChatML fine-tune of Llama 2 ends its turns with <|im_end|>)
END_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
             "<end_of_utterance>", "<|return|>", "<|call|>")
DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unknown": 0}}  # SentencePiece files that name none


@dataclasses.dataclass
class Vocab:
    tokenizer: HFTokenizer
    bos_id: int | None
    eos_id: int | None  # the one the file names (a chat template's eos_token)
    end_ids: set[int]  # every token that ends generation: eos, eot, eom and the END_TEXTS
    add_bos: bool  # BOS before a prompt: the file's flag, else the vocabulary's default


def read(fields: dict) -> Vocab:
    """The vocabulary of a GGUF's `tokenizer.*` fields."""
    kind = fields.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise ValueError(f"GGUF tokenizer type {kind!r} is not supported (byte-level BPE 'gpt2' and "
                         "SentencePiece 'llama' are)")
    tokens = fields["tokenizer.ggml.tokens"]
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"the GGUF has {len(types)} token types for {len(tokens)} tokens")
    if len(set(tokens)) != len(tokens):
        first: dict[str, int] = {}
        twice = next((first[t], i, t) for i, t in enumerate(tokens) if first.setdefault(t, i) != i)
        raise ValueError(f"the GGUF vocabulary lists token {twice[2]!r} twice (ids {twice[0]} and {twice[1]})")
    defaults = {key: at for key, at in DEFAULT_IDS.get(kind, {}).items() if at < len(tokens)}
    named = ("bos", "eos", "eot", "eom", "unknown")
    ids = {**defaults, **{key: fields[f"tokenizer.ggml.{key}_token_id"] for key in named
                          if f"tokenizer.ggml.{key}_token_id" in fields}}
    for key, at in ids.items():
        if not isinstance(at, int) or not 0 <= at < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id {at} is outside the vocabulary of {len(tokens)} tokens")
    tokenizer, add_bos = BUILDERS[kind](tokens, {**fields, "tokenizer.ggml.unknown_token_id": ids.get("unknown")})
    ends = {ids[key] for key in ("eos", "eot", "eom") if key in ids}
    ends |= {i for i, t in enumerate(tokens) if t in END_TEXTS}
    for i in ends:  # llama.cpp makes them control tokens whatever the file says
        types[i] = types[i] if types[i] == UNKNOWN else CONTROL
    # control (and unknown) tokens are special, user-defined ones added: both match whole, never split
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty in (UNKNOWN, CONTROL)])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return Vocab(tokenizer, ids.get("bos"), ids.get("eos"), ends,
                 bool(fields.get("tokenizer.ggml.add_bos_token", add_bos)))


def _byte_level(tokens: list[str], fields: dict) -> tuple[HFTokenizer, bool]:
    """GPT-2's byte-level BPE: every byte is a printable character, the merges are listed, and
    the text is cut into words first as its `tokenizer.ggml.pre` name says."""
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError("the GGUF file has no tokenizer.ggml.merges: the vocabulary must be in the file")
    vocab = {t: i for i, t in enumerate(tokens)}
    odd = next((m for m in fields["tokenizer.ggml.merges"] if not isinstance(m, str)), None)
    if odd is not None:
        raise ValueError(f"tokenizer.ggml.merges must list strings (\"a b\"), got {odd!r}")
    listed = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    merges = [m for m in listed if len(m) == 2 and m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    if len(merges) < len(listed):  # llama.cpp keeps such a merge, which never applies; tokenizers refuses the file
        kept = set(merges)
        log.warning("%d of the GGUF's %d merges are not two tokens making a third, and are skipped (the first: "
                    "%r)", len(listed) - len(merges), len(listed), " ".join(next(m for m in listed if m not in kept)))
    split = pretokenize.for_gguf(fields.get("tokenizer.ggml.pre"))
    tokenizer = _bpe(vocab, merges, fuse_unk=False, ignore_merges=split.ignore_merges)
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
    merges = _merges_by_score(tokens, scores, vocab)  # merges the file may list are ignored, as llama.cpp does
    unk = fields.get("tokenizer.ggml.unknown_token_id")
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
        raise ValueError(f"the GGUF vocabulary does not hold together: {str(e).splitlines()[0]}") from None


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    ranked = [(-scores[i], i, cut, t[:cut], t[cut:]) for i, t in enumerate(tokens)
              for cut in range(1, len(t)) if t[:cut] in vocab and t[cut:] in vocab]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}
