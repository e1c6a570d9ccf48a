"""GGUF vocabularies read as llama.cpp reads them. SentencePiece ones (Llama 2, Mistral 7B,
TinyLlama): the tokens SentencePiece itself gives, the same as HF's tokenizer of the same file, and
llama.cpp's rules where the two differ (the "▁" before text that starts with a space, and again
after a special token); a model of such a file loads and generates. Byte-level ones: the rules a
`tokenizer.ggml.pre` name brings besides its expression (SmolLM's digits one at a time, DeepSeek's
several expressions in turn, Llama 3's words that are tokens taken whole)."""
from __future__ import annotations

import io
import pathlib

import pytest
import torch
from test_gguf import TYPES, write_gguf

from inferlab import LLM, SamplingParams
from inferlab.model import loader, weight_cache
from inferlab.model.base import ModelLoadError
from inferlab.model.tokenizer import _BYTE_OF_CHAR, Tokenizer

SPACE = "\u2581"
TEXTS = ["Hello world", "The capital of France is Paris.", "multiple   spaces  here", "naïve café — ok?!",
         "tabs\tand\nnew lines\n\n", "digits 1234567 and 3.14", "llamas 🦙 and emoji 🎉!", "日本語のテキスト",
         "I'LL see you're 2026's", "path/to/file.py:42"]


@pytest.fixture(scope="module")
def spm_fields(smol) -> dict:
    """A SentencePiece vocabulary as llama.cpp's converter lays it out (<unk>, <s>, </s>, the 256 byte
    tokens, then the pieces with their scores), made from the embedded model's: each of its tokens
    that is whole UTF-8 text, spaces written "▁", scored by its rank (earlier merges score higher)."""
    tok = weight_cache.load(loader.embedded_model_path())[2]
    pieces: dict[str, None] = {}
    for token, kind in zip(tok["tokenizer.ggml.tokens"], tok["tokenizer.ggml.token_type"]):
        try:
            text = bytes(_BYTE_OF_CHAR[c] for c in token).decode() if kind == 1 else ""
        except (KeyError, UnicodeDecodeError):  # part of a character: SentencePiece keeps bytes apart
            continue
        pieces.setdefault(text.replace(" ", SPACE), None) if text else None
    pieces.pop("<unk>", None), pieces.pop("<s>", None), pieces.pop("</s>", None)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * len(pieces)],
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


@pytest.fixture(scope="module")
def spm_gguf(spm_fields, tmp_path_factory) -> str:
    return write_gguf(str(tmp_path_factory.mktemp("spm") / "spm.gguf"), TYPES, vocab=spm_fields)


def test_sentencepiece_gguf_tokens_are_hfs(spm_gguf):
    """HF builds its tokenizer of the file the same way (merges from the scores, byte fallback)."""
    transformers = pytest.importorskip("transformers")
    ours = loader.load_model(spm_gguf, "float32", torch.device("cpu"))[1]
    folder, name = spm_gguf.rsplit("/", 1)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text == theirs.decode(ids)
    emoji = [ours.id_to_token(i) for i in ours.encode("🦙", add_special_tokens=False)]
    assert emoji[-4:] == [f"<0x{b:02X}>" for b in "🦙".encode()]  # not in the vocabulary: its UTF-8 bytes
    assert ours.encode("Paris")[0] == 1 and ours.encode("Paris")[1:] == ours.encode("Paris", add_special_tokens=False)


def test_the_tokenizer_answers_transformers_calls_as_hfs_does(spm_gguf):
    """Scripts written against the HF tokenizer vLLM's get_tokenizer() returns call it, take its
    len() and batch_decode: the same answers as transformers' on the same file."""
    transformers = pytest.importorskip("transformers")
    ours = loader.load_model(spm_gguf, "float32", torch.device("cpu"))[1]
    folder, name = spm_gguf.rsplit("/", 1)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    assert len(ours) == len(theirs)
    for text in (TEXTS[0], TEXTS[:3]):
        assert ours(text).input_ids == theirs(text).input_ids == ours(text)["input_ids"]
        assert ours(text).attention_mask == theirs(text).attention_mask
    assert torch.equal(ours(TEXTS[0], return_tensors="pt").input_ids, theirs(TEXTS[0], return_tensors="pt").input_ids)
    rows = ours(TEXTS[:3]).input_ids
    assert ours.batch_decode(rows) == theirs.batch_decode(rows) != theirs.batch_decode(rows, skip_special_tokens=True)
    assert ours.batch_decode(rows, skip_special_tokens=True) == theirs.batch_decode(rows, skip_special_tokens=True)
    tokens = ours.convert_ids_to_tokens(rows[0])
    assert tokens == theirs.convert_ids_to_tokens(rows[0]) and ours.convert_tokens_to_ids(tokens) == rows[0]
    pieces = ours.tokenize(TEXTS[1])
    assert pieces == theirs.tokenize(TEXTS[1])
    assert ours.convert_tokens_to_string(pieces) == theirs.convert_tokens_to_string(pieces)
    pt = ours(TEXTS[0], return_tensors="pt").input_ids  # a tensor, as transformers' decode takes
    assert ours.decode(pt) == theirs.decode(pt[0]) == ours.decode(pt[0])  # the BOS kept, as transformers' default
    assert ours.decode(pt, skip_special_tokens=True) == theirs.decode(pt[0], skip_special_tokens=True)
    assert ours.decode(rows[0][1]) == theirs.decode(rows[0][1]) and ours.batch_decode(pt) == [ours.decode(pt)]
    with pytest.raises(ValueError, match="not a token of this vocabulary"):
        ours.convert_tokens_to_string(["no such token"])
    # a template's variables as keywords (Qwen3's enable_thinking=False), as transformers passes them
    template = "{{ greeting }} {{ messages[0].content }}{% if not enable_thinking %} /no_think{% endif %}"
    hi = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(hi, chat_template=template, greeting="Bonjour", enable_thinking=False) == \
        theirs.apply_chat_template(hi, chat_template=template, greeting="Bonjour", enable_thinking=False,
                                   tokenize=False) == "Bonjour hi /no_think"
    with pytest.raises(ValueError, match="return_tensors must be None or 'pt'"):
        ours("a", return_tensors="np")
    with pytest.raises(AttributeError):
        getattr(ours("a"), "token_type_ids")  # noqa: B009 (a missing key is an AttributeError, as hasattr needs)


def test_the_tokens_are_those_sentencepiece_itself_gives():
    """SentencePiece's own BPE, trained here on this project's docs with Llama's settings (byte
    fallback, a dummy prefix, spaces kept), written out as llama.cpp's converter writes a vocabulary:
    its tokens for lines of code and prose, leading spaces and characters it never saw included."""
    spm = pytest.importorskip("sentencepiece")
    root = pathlib.Path(__file__).parent.parent
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    corpus = [line for f in docs for line in f.read_text().splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=2000, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    ids = range(sp.get_piece_size())
    kind = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    tok = Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in ids], "tokenizer.ggml.token_type": kind,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
    texts = [*TEXTS, " leading space", "  two", "trailing  ", "a\tb\nc\n\nd",
             *(root / "inferlab" / "engine.py").read_text().splitlines()[:150]]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.text(tok.encode(text)) == text == sp.decode(sp.encode(text))


def test_llama_cpp_rules_where_hf_differs(spm_fields):
    """SentencePiece writes "▁" before the text even when it starts with a space, and llama.cpp
    again before each piece of text that follows a special token (Llama 2's chat turns, `</s><s>`,
    were encoded that way by its authors); decoding drops the one it added."""
    tok = Tokenizer.from_gguf_fields(spm_fields)

    def pieces(text: str) -> str:
        return "".join(tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False))
    assert pieces("hi") == f"{SPACE}hi" and pieces(" hi") == f"{SPACE}{SPACE}hi"
    assert tok.text(tok.encode(" hi")) == " hi"
    after = tok.encode("</s>hi there", add_special_tokens=False)
    assert after == [2, *tok.encode("hi there", add_special_tokens=False)]
    the = tok.backend.token_to_id(f"{SPACE}the")
    assert tok.token_bytes(the) == b" the" and tok.decode([the]) == "the"  # alone, decoding drops the space
    no_prefix = Tokenizer.from_gguf_fields({**spm_fields, "tokenizer.ggml.add_space_prefix": False,
                                            "tokenizer.ggml.add_bos_token": False})
    assert "".join(no_prefix.id_to_token(i) for i in no_prefix.encode("hi there")) == f"hi{SPACE}there"


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.scores": None}, "a SentencePiece GGUF needs a score per token"),
    ({"tokenizer.ggml.model": "bert"}, "GGUF tokenizer type 'bert' is not supported"),
    ({"tokenizer.ggml.unknown_token_id": 10 ** 6}, "unknown_token_id 1000000 is outside the vocabulary"),
])
def test_a_vocabulary_that_cannot_be_read_is_one_line(spm_fields, change, message):
    fields = {k: v for k, v in {**spm_fields, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_fields(fields)


def test_a_sentencepiece_gguf_model_generates_text_as_its_tokens_decode(spm_gguf, spm_fields):
    """The streamed text keeps the space each "▁" stands for (decoding alone would strip the first)."""
    llm = LLM(spm_gguf, max_model_len=128)
    tok = llm.get_tokenizer()
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0))[0]
    ids = out.outputs[0].token_ids
    prompt = out.prompt_token_ids
    assert prompt[0] == 1 and len(ids) == 12
    whole = tok.decode(prompt + list(ids))
    assert out.outputs[0].text == whole[len(tok.decode(prompt)):]
    with pytest.raises(ModelLoadError, match="needs a score per token"):
        bad = {k: v for k, v in spm_fields.items() if k != "tokenizer.ggml.scores"}
        loader.load_model(write_gguf(spm_gguf.replace("spm.gguf", "bad.gguf"), TYPES, vocab=bad),
                          "float32", torch.device("cpu"))


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    """The text as the pre-tokenizer cuts it, before any merge."""
    cut = tok.backend.pre_tokenizer.pre_tokenize_str(text)
    return [bytes(_BYTE_OF_CHAR[c] for c in piece).decode() for piece, _ in cut]


@pytest.mark.parametrize("pre, text, pieces", [
    # SmolLM's own tokenizer cuts digits apart before GPT-2's expression: the embedded model's
    ("smollm", "in 2026,\n  42", ["in", " ", "2", "0", "2", "6", ",", "\n  ", "4", "2"]),
    ("deepseek-v3", "x=12345 日本語 you're", ["x", "=", "123", "45", " ", "日本語", " you", "'re"]),
    ("deepseek-llm", "x=12345 日本語 you're", ["x", "=", "12345", " ", "日本語", " you", "'", "re"]),
    ("deepseek-coder", "x = 12345\treturn", ["x", " = ", "1", "2", "3", "4", "5", "\treturn"]),
])
def test_a_pre_tokenizer_name_brings_its_expressions_in_turn(smol, pre, text, pieces):
    fields = {**weight_cache.load(loader.embedded_model_path())[2], "tokenizer.ggml.pre": pre}
    assert _pieces(Tokenizer.from_gguf_fields(fields), text) == pieces


def test_a_file_naming_no_pre_tokenizer_is_split_as_llama_cpp_splits_it(smol, caplog):
    """llama.cpp's default rule (punctuation runs first, then GPT-2's expression, digit runs, threes)
    with its warning; the ids are those `llama-tokenize` gives for the embedded vocabulary without
    its `tokenizer.ggml.pre` (GPT-2's expression alone gave other ones for the first and last)."""
    fields = dict(weight_cache.load(loader.embedded_model_path())[2])
    del fields["tokenizer.ggml.pre"]
    with caplog.at_level("WARNING", logger="inferlab"):
        tok = Tokenizer.from_gguf_fields(fields)
    assert "names no pre-tokenizer" in caplog.text
    assert tok.encode("don't stop\ttabs   spaces\r\n\r\nx", add_special_tokens=False) == \
        [12420, 23, 100, 2853, 197, 100, 7366, 256, 5600, 7209, 198, 104]
    assert tok.encode("a+b<=c^d~e|f $$$ 1234567", add_special_tokens=False) == \
        [81, 27, 82, 44, 45, 83, 78, 84, 110, 85, 108, 86, 216, 9212, 20, 216, 33, 34, 35, 36, 37, 38, 39]
    assert _pieces(tok, "don't 1234567") == ["don", "'", "t", " ", "123", "456", "7"]
    assert _pieces(Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "default"}), "a+b") == ["a", "+", "b"]


def test_llama3_takes_a_word_that_is_a_token_whole_without_its_merges(smol):
    """llama.cpp's ignore_merges (and Llama 3's tokenizer.json): a vocabulary may hold tokens its
    merges never build; Qwen2's rule builds what the merges build."""
    fields = dict(weight_cache.load(loader.embedded_model_path())[2])
    del fields["tokenizer.ggml.add_bos_token"]  # Llama 3's files add BOS where they do not say
    fields["tokenizer.ggml.merges"] = [m for m in fields["tokenizer.ggml.merges"] if m.replace(" ", "") != "Ġhello"]
    llama3 = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "llama-bpe"})
    qwen2 = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "qwen2"})
    hello = llama3.backend.token_to_id("Ġhello")
    assert llama3.encode("say hello", add_special_tokens=False)[1:] == [hello]
    assert len(qwen2.encode("say hello", add_special_tokens=False)) == 3
    assert llama3.encode("hi")[0] == llama3.bos_token_id and qwen2.encode("hi") == qwen2.encode("hi", False)


def test_what_llama_cpp_takes_from_a_sentencepiece_vocabulary_beyond_its_tokens(spm_fields, caplog):
    """Found by trying Llama 2, TinyLlama and ChatML files beside llama-server: a token's text in
    logprobs keeps its space; a chat prompt gets its one BOS whether the template writes it or not;
    a file naming no bos/eos gets SentencePiece's 1 and 2; a vocabulary's <|im_end|> ends
    generation though eos is </s>; a duplicate token is refused (llama.cpp asserts); a BOS-only
    prompt's first output token keeps its space."""
    from inferlab.detokenizer import IncrementalDetokenizer
    fields = {**spm_fields, "tokenizer.ggml.tokens": [*spm_fields["tokenizer.ggml.tokens"], "<|im_end|>"],
              "tokenizer.ggml.token_type": [*spm_fields["tokenizer.ggml.token_type"], 3],
              "tokenizer.ggml.scores": [*spm_fields["tokenizer.ggml.scores"], 0.0]}
    tok = Tokenizer.from_gguf_fields(fields)
    the = tok.backend.token_to_id(f"{SPACE}the")
    assert tok.token_text(the) == " the" and tok.token_text(1) == "<s>"
    assert tok.encode_chat("<|im_end|>hi")[:2] == [1, len(fields["tokenizer.ggml.tokens"]) - 1]
    assert tok.encode_chat("<s>[INST] hi") == tok.encode("[INST] hi")  # the template's BOS, not a second one
    assert tok.eos_token_ids == {2, len(fields["tokenizer.ggml.tokens"]) - 1} and tok.eos_token_id == 2
    unnamed = Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if not k.endswith(("bos_token_id",
                                                                                             "eos_token_id"))})
    assert unnamed.encode("hi")[0] == 1 and 2 in unnamed.eos_token_ids and unnamed.eos_token == "</s>"
    with pytest.raises(ValueError, match=r"lists token '▁the' twice \(ids \d+ and \d+\)"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.tokens": [*fields["tokenizer.ggml.tokens"][:-1],
                                                                        f"{SPACE}the"]})
    detok = IncrementalDetokenizer(tok, [1], [])
    detok.add_token(the)
    assert detok.text == " the"


def test_merges_that_do_not_make_a_token_are_skipped_with_a_warning(smol, caplog):
    """The tokenizers library refused the file over one merge, with a three-line message; llama.cpp
    loads it (such a merge never applies)."""
    fields = dict(weight_cache.load(loader.embedded_model_path())[2])
    fields["tokenizer.ggml.merges"] = ["zzq", "Ġ zzq", *fields["tokenizer.ggml.merges"]]
    with caplog.at_level("WARNING", logger="inferlab"):
        tok = Tokenizer.from_gguf_fields(fields)
    assert "2 of the GGUF's" in caplog.text and "'zzq'" in caplog.text
    whole = Tokenizer.from_gguf_fields(weight_cache.load(loader.embedded_model_path())[2])
    assert tok.encode("hello there, zzq") == whole.encode("hello there, zzq")
