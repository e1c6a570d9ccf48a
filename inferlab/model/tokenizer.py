"""Tokenizer: text <-> token ids, the chat template and EOS ids, all read from the model's own files."""
from __future__ import annotations

import functools
import json
import numbers
import os
import re

import torch
from tokenizers import Tokenizer as HFTokenizer

from inferlab.model import gguf_vocab
from inferlab.model.chat_template import ChatTemplateError, cut_after, render, text_messages
from inferlab.text import is_text


class Encoding(dict):
    """What `tokenizer(text)` returns, as transformers' BatchEncoding: a dict whose keys read as attributes."""

    def __getattr__(self, name: str) -> object:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tokenizer:
    def __init__(self, backend: HFTokenizer, eos_token_ids: set[int], bos_token: str | None = None,
                 eos_token: str | None = None, chat_template: str | None = None,
                 add_bos_token: bool = False, bos_token_id: int | None = None,
                 rerank_template: str | None = None) -> None:
        self.backend = backend
        self.rerank_template = rerank_template  # a reranker GGUF's pair prompt, "...{query}...{document}..."
        self.eos_token_ids = eos_token_ids
        self.bos_token, self.eos_token, self.bos_token_id = bos_token, eos_token, bos_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.vocab_size = backend.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, not {type(text).__name__}")
        if not is_text(text):  # named by the character: a position would be the rendered template's
            bad = next(c for c in text if not is_text(c))
            raise ValueError(f"the prompt is not valid Unicode text: it holds {bad!r}, a lone surrogate (bytes "
                             "that are no UTF-8, or \\ud800 escaped in JSON)")
        # encode_batch lets other threads run while it works (encode holds the GIL: a 20 MB prompt
        # tokenized in a server's worker thread would still stall its event loop for seconds)
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_chat(self, text: str) -> list[int]:
        """A chat template's text as prompt ids, with one BOS where the vocabulary adds one, whether
        the template writes it or not (as llama.cpp and Ollama take chat prompts: a ChatML or Zephyr
        template on a Llama 2 vocabulary writes none)."""
        return self.encode(text, add_special_tokens=True)

    def encode_pair(self, first: str, second: str) -> list[int]:
        """Two texts as one prompt, as transformers' `tokenizer(first, second)` makes a cross-encoder's
        input: by the tokenizer.json's post-processor where its template adds BOS (Llama 3's puts one
        before each text), else the first text's ids (with BOS where the vocabulary adds one) then
        the second's. A reranker GGUF's `rerank_template` is written out instead, the query and the
        document put in its place, as llama.cpp's server does."""
        ids = [*self.encode(first), *self.encode(second, add_special_tokens=False)]  # (their checks too)
        if self.rerank_template is not None:
            text = self.rerank_template.replace("{query}", first).replace("{document}", second)
            return self.encode(text, add_special_tokens=False)
        if _post_processor_adds_bos(self.backend, self.bos_token_id):
            return self.backend.encode(first, second, add_special_tokens=True).ids
        return ids

    def decode(self, ids: int | list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of token ids: a list, one id, or a tensor of them; special tokens are kept unless
        skipped (transformers' decode and its default). Answers' text leaves them out."""
        if ids is None or isinstance(ids, str):
            raise TypeError(f"decode takes token ids (a list, an int or a tensor), not {type(ids).__name__}")
        if not isinstance(ids, list):
            ids = torch.as_tensor(ids).reshape(-1).tolist()
        vocab = self.backend.get_vocab_size(with_added_tokens=True)
        for i in ids:  # 1.5 was read as 1, and -1 was an OverflowError from the Rust side
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab:
                raise ValueError(f"decode: {i!r} is no token id in [0, {vocab})")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def text(self, ids: list[int]) -> str:
        """An answer's text of token ids: special tokens left out, as vLLM's skip_special_tokens default."""
        return self.backend.decode(ids, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # transformers' names, for scripts written against the tokenizer vLLM's get_tokenizer() returns
    # (decoding keeps special tokens unless told to skip them, as transformers' does; answers use `text`)
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> Encoding:
        """`tokenizer(text)`: input_ids and attention_mask of a text, or of each text of a list."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', not {return_tensors!r}")
        rows = [self.encode(t, add_special_tokens) for t in (text if isinstance(text, list) else [text])]
        masks = [[1] * len(row) for row in rows]
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise ValueError("texts of different token counts cannot be one tensor (no padding here)")
            return Encoding(input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks))
        if isinstance(text, list):
            return Encoding(input_ids=rows, attention_mask=masks)
        return Encoding(input_ids=rows[0], attention_mask=masks[0])

    def batch_decode(self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def tokenize(self, text: str) -> list[str]:
        """The token strings of a text, without special tokens (transformers' `tokenize`)."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = [self.backend.token_to_id(t) for t in tokens]
        if None in ids:
            raise ValueError(f"{tokens[ids.index(None)]!r} is not a token of this vocabulary")
        return self.decode(ids, skip_special_tokens=False)

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, even part of a character (a 4-byte emoji is often split over
        several tokens, each of which decodes to "\ufffd" alone): OpenAI's logprobs `bytes`."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added_ids:
            if '"ByteLevel"' in self._decoder and all(c in _BYTE_OF_CHAR for c in piece):
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece's byte fallback
                return bytes.fromhex(m.group(1))
            if '"ByteFallback"' in self._decoder:  # decoded alone, the piece would lose the space its "▁" stands for
                return piece.replace(gguf_vocab.SPACE, " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """A token's text alone, as logprobs show it: its leading space kept (decoding a SentencePiece
        token alone drops the space its "▁" stands for), a piece of a character as "\ufffd"."""
        return self.token_bytes(token_id).decode(errors="replace")

    @functools.cached_property
    def _added_ids(self) -> set[int]:
        return set(self.backend.get_added_tokens_decoder())

    @functools.cached_property
    def _decoder(self) -> str:
        """The decoder's steps as JSON, which tell byte-level BPE from SentencePiece (its ByteFallback)."""
        return self.backend.decoder.__getstate__().decode() if self.backend.decoder else ""

    @property
    def eos_token_id(self) -> int | None:
        """transformers' name: the end-of-sequence token (the one the model names, else the lowest of
        those ending generation)."""
        named = self.backend.token_to_id(self.eos_token) if self.eos_token is not None else None
        return named if named is not None else min(self.eos_token_ids) if self.eos_token_ids else None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False, template_kwargs: dict | None = None, *,
                            chat_template: str | None = None, tokenize: bool = False,
                            **kwargs: object) -> str | list[int]:
        """The conversation as the model's template writes it (or another Jinja `chat_template`), as
        text, or its token ids with `tokenize` (transformers' default; this one's is text, which
        vLLM's callers ask for with tokenize=False). `continue_final_message` (vLLM's and
        transformers') leaves the last message, an assistant's, open, so the model continues it
        instead of answering after it: the "prefill the reply" pattern. `template_kwargs` are more
        variables for the template (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`);
        other keyword arguments are such variables too, as transformers passes them."""
        if kwargs:
            template_kwargs = {**(template_kwargs or {}), **kwargs}
        if tokenize:
            text = self.apply_chat_template(messages, add_generation_prompt, continue_final_message, template_kwargs,
                                            chat_template=chat_template)
            return self.encode_chat(text)
        chat_template = chat_template if chat_template is not None else self.chat_template
        messages = text_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ChatTemplateError("continue_final_message needs add_generation_prompt false")
            final = messages[-1] if messages and isinstance(messages[-1], dict) else {}
            if final.get("role") != "assistant" or not isinstance(final.get("content"), str) \
                    or not final["content"].strip():
                raise ChatTemplateError("continue_final_message needs a last message from the assistant, with text")
            return cut_after(self.apply_chat_template(messages, False, template_kwargs=template_kwargs,
                                                       chat_template=chat_template), final["content"])
        return render(chat_template, messages, add_generation_prompt, template_kwargs, self.bos_token,
                      self.eos_token)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        vocab = gguf_vocab.read(fields)
        tokens = fields["tokenizer.ggml.tokens"]
        bos, eos = (tokens[i] if i is not None else None for i in (vocab.bos_id, vocab.eos_id))
        return cls(vocab.tokenizer, vocab.end_ids, bos_token=bos, eos_token=eos,
                   chat_template=fields.get("tokenizer.chat_template"), add_bos_token=vocab.add_bos,
                   bos_token_id=vocab.bos_id, rerank_template=fields.get("tokenizer.chat_template.rerank"))

    @classmethod
    def from_folder(cls, path: str, config: dict) -> Tokenizer:
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        try:
            backend = HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception for a damaged file
            raise ValueError(f"cannot read {tj}: {e}") from None
        tc = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = tc.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_text(key: str) -> str | None:
            tok = tc.get(key)
            return tok.get("content") if isinstance(tok, dict) else tok

        bos, eos = token_text("bos_token"), token_text("eos_token")
        gen = _read_json(os.path.join(path, "generation_config.json"))
        eos_ids: set[int] = set()
        for source in (gen.get("eos_token_id"), config.get("eos_token_id")):
            eos_ids.update(source if isinstance(source, list) else [source] if source is not None else [])
        if eos is not None and backend.token_to_id(eos) is not None:
            eos_ids.add(backend.token_to_id(eos))
        bos_id = backend.token_to_id(bos) if bos else None
        # A tokenizer.json post-processor (e.g. Llama's TemplateProcessing) already adds BOS.
        add_bos = tc.get("add_bos_token", False) or _post_processor_adds_bos(backend, bos_id)
        return cls(backend, eos_ids, bos_token=bos, eos_token=eos, chat_template=template,
                   add_bos_token=add_bos, bos_token_id=bos_id)


def _bytes_to_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is written as one printable character, the
    printable bytes as themselves and the rest as the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF_CHAR = _bytes_to_chars()


def _post_processor_adds_bos(backend: HFTokenizer, bos_id: int | None) -> bool:
    if bos_id is None or backend.post_processor is None:
        return False
    return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
