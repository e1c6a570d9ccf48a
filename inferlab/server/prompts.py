"""Request bodies to engine prompts, off the event loop: chat templating and tokenizing run in a
worker thread (the tokenizer lets the loop serve others meanwhile), and a text that cannot fit the
context is refused by its length alone, before any of that work."""
from __future__ import annotations

import asyncio

from inferlab.model.fim import fill_prompt
from inferlab.model.tokenizer import Tokenizer


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tok, self.max_model_len = tokenizer, max_model_len
        # No token covers more characters than the longest vocabulary entry (for byte-level BPE, its
        # bytes: at least as many as the characters they spell), so a longer text needs more tokens.
        self.longest_token = max(len(t) for t in tokenizer.backend.get_vocab())
        self.max_chars = max_model_len * self.longest_token

    def check_length(self, chars: int) -> None:
        if chars > self.max_chars:
            raise ValueError(f"the prompt has {chars:,} characters, more than this model's maximum context length "
                             f"of {self.max_model_len} tokens can hold (a token spells at most "
                             f"{self.longest_token} characters)")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.check_length(len(text))
        return await asyncio.to_thread(self.tok.encode, text, add_special_tokens)

    async def completion(self, prompt: str | dict, cache_salt: str | None) -> dict:
        """An engine prompt dict for one entry of a completions `prompt` (text or token ids)."""
        if isinstance(prompt, dict):
            return {"prompt": None, "prompt_token_ids": prompt["prompt_token_ids"], "cache_salt": cache_salt}
        return {"prompt": prompt, "prompt_token_ids": await self.encode(prompt), "cache_salt": cache_salt}

    async def fill(self, prefix: str, suffix: str, cache_salt: str | None) -> dict:
        """An engine prompt dict asking for the text between `prefix` and `suffix` (model/fim.py)."""
        self.check_length(len(prefix) + len(suffix))
        ids = await asyncio.to_thread(fill_prompt, self.tok, prefix, suffix)
        return {"prompt": prefix, "prompt_token_ids": ids, "cache_salt": cache_salt}

    async def chat(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                   template_kwargs: dict | None, cache_salt: str | None) -> dict:
        """An engine prompt dict for a conversation, with the model's chat template applied."""
        self.check_length(sum(len(m["content"]) for m in messages))
        text = await asyncio.to_thread(self.tok.apply_chat_template, messages, add_generation_prompt,
                                       continue_final_message, template_kwargs)
        return {"prompt": text, "prompt_token_ids": await asyncio.to_thread(self.tok.encode_chat, text),
                "cache_salt": cache_salt}
