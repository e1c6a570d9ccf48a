"""How a GGUF's byte-level BPE vocabulary cuts text before its merges, by the `tokenizer.ggml.pre`
name the file carries, as llama.cpp reads that name. The merges were learned on pieces cut by
particular regular expressions, so others give other tokens for the same text (GPT-2's keeps
"\\n\\n" apart where Qwen2's and Llama 3's have one token; SmolLM and Qwen2 take digits one at a
time). The expressions are the models' own, as their tokenizer.json files and llama.cpp write them."""
from __future__ import annotations

import dataclasses
import logging

from tokenizers import Regex, pre_tokenizers

log = logging.getLogger("inferlab")


@dataclasses.dataclass(frozen=True)
class Split:
    """One vocabulary's rule: `expressions` cut the text in turn, each cutting the pieces the one
    before left; with `ignore_merges` a piece that is itself a token is taken whole (Llama 3's
    vocabulary has tokens its merges never build); `add_bos` where the file does not say."""
    expressions: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False

    def pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
        cuts = [pre_tokenizers.Split(Regex(e), behavior="isolated") for e in self.expressions]
        return pre_tokenizers.Sequence([*cuts, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TAIL = r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # line breaks, then runs of spaces (the last one's kept for the next word)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp's rule for a file that names none, or "default": punctuation runs cut off first (so
# "don't" is three pieces), then GPT-2's expression, digit runs, and digits in threes
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _TAIL
QWEN35 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*" + _TAIL
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*" + _TAIL)
# DeepSeek LLM (V2, V2-Lite): its own listing of the cased letters (not all of Unicode's: no
# mathematical alphanumerics), ASCII and full-width punctuation, CJK and Hangul runs, digit runs
_DEEPSEEK_CASED = (
    r"A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}"
    r"\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}"
    r"\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}"
    r"\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}"
    r"\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}"
    r"\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}"
    r"\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}"
    r"\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}"
    r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}"
    r"\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}"
    r"\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}")
_CJK = r"\x{4E00}-\x{9FA5}"
_CJK_HANGUL = rf"[{_CJK}\x{{800}}-\x{{4E00}}\x{{AC00}}-\x{{D7FF}}]+"
DEEPSEEK_LLM = (r"[\r\n]", rf"\s?[{_DEEPSEEK_CASED}]+",
                r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+", r"\s+$",
                _CJK_HANGUL, r"\p{N}+")
DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+" + _TAIL
# Viking: runs up to a space or a sentence's punctuation (Latin, CJK, Devanagari, Arabic), then digits apart
VIKING = (r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{0964}\x{06D4}\x{060C})]+", r"\p{N}")
# DeepSeek V3: digits in threes, CJK and kana runs, then Llama 3's kind of expression
DEEPSEEK_V3 = (r"\p{N}{1,3}", rf"[{_CJK}\x{{3040}}-\x{{309F}}\x{{30A0}}-\x{{30FF}}]+",
               r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
               r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    Split((LLAMA3,), ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), Split((LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "kormo"), Split((QWEN2,))),
    "qwen35": Split((QWEN35,)),
    "tekken": Split((TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2"), Split((GPT4O,))),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    Split((r"\p{N}", GPT2))),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "mellum"), Split((GPT2,))),
    "deepseek-llm": Split(DEEPSEEK_LLM),
    "deepseek-coder": Split(DEEPSEEK_CODER),
    "deepseek-v3": Split(DEEPSEEK_V3),
    "seed-coder": Split((SEED_CODER,)),
    "viking": Split(VIKING),
    "default": Split(DEFAULT),
}


def for_gguf(pre: str | None) -> Split:
    """The rule of a `tokenizer.ggml.pre` name. A file that names none gets llama.cpp's default rule,
    with llama.cpp's warning; a name not known here (llama.cpp refuses it) GPT-2's, the closer guess
    for a recent vocabulary, with a warning too."""
    if pre in SPLITS:
        return SPLITS[pre]
    if pre is None:
        log.warning("the GGUF names no pre-tokenizer (tokenizer.ggml.pre): text is split by llama.cpp's default "
                    "rule, which may give some prompts other tokens than the model's own tokenizer does")
        return SPLITS["default"]
    log.warning("GGUF pre-tokenizer %r is not known here: text is split as GPT-2 splits it, so some "
                "prompts may get other tokens than the model's own tokenizer gives", pre)
    return SPLITS["gpt-2"]
