"""A request as the engine takes it: its id (a string not in use) and its prompt (text, token ids,
or a dict of either: vLLM's shape, optionally with a `cache_salt`), resolved to token ids and
checked against the engine's limits, with one-line `ValueError`s."""
from __future__ import annotations

from dataclasses import dataclass

from inferlab.model.tokenizer import Tokenizer
from inferlab.sampling_params import SamplingParams
from inferlab.text import is_text

PromptType = str | list[int] | dict


@dataclass
class PromptInputs:
    text: str | None
    token_ids: list[int]
    cache_salt: str | None = None


def _token_ids(ids: object) -> list[int] | None:
    if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return list(ids)
    return None


def check_request_id(request_id: object, live: dict) -> None:
    """A string (vLLM's ids are: a number or a tuple was taken, then could not be aborted) not in use."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__} {request_id!r}")
    if request_id in live:
        raise ValueError(f"request id {request_id!r} is already in use")


def parse_prompt(prompt: PromptType, tokenizer: Tokenizer, vocab_size: int) -> PromptInputs:
    """Token ids for `prompt`, all inside the vocabulary, and its cache salt. A dict takes
    `prompt_token_ids` (with an optional `prompt` text kept for outputs) or `prompt`, and
    `cache_salt`: a request only shares cached blocks with requests of the same salt."""
    salt = None
    if isinstance(prompt, dict):
        if "multi_modal_data" in prompt or "mm_processor_kwargs" in prompt:
            raise ValueError("multi_modal_data: this model reads text only")
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"})
        if unknown:  # dropped, they would change nothing and say nothing
            raise ValueError(f"a prompt dict takes prompt, prompt_token_ids and cache_salt, not {unknown[0]!r}")
        salt = prompt.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise ValueError("cache_salt must be a non-empty string")
        if salt is not None and not is_text(salt):  # its block keys are UTF-8: found only in the engine step
            raise ValueError("cache_salt must be valid Unicode text (a lone surrogate such as \\ud800 is not)")
        if "prompt_token_ids" in prompt:
            ids = _token_ids(prompt["prompt_token_ids"])
            if ids is None:
                raise ValueError("prompt_token_ids must be a list of integers")
            inputs = PromptInputs(prompt.get("prompt"), ids, salt)
        elif "prompt" in prompt:
            inputs = parse_prompt(prompt["prompt"], tokenizer, vocab_size)
        else:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    elif isinstance(prompt, str):
        inputs = PromptInputs(prompt, tokenizer.encode(prompt))
    elif (ids := _token_ids(prompt)) is not None:
        inputs = PromptInputs(None, ids)
    else:
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}")
    inputs.cache_salt = salt
    if not inputs.token_ids:
        raise ValueError("the prompt is empty")
    bad = next((t for t in inputs.token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return inputs


def check_request(inputs: PromptInputs, params: SamplingParams, priority: object, vocab_size: int,
                  max_model_len: int, max_request_tokens: int) -> None:
    """Refuse a request the engine could not finish: a prompt that leaves no room for one generated
    token in the context or in the whole KV pool, a priority that is not an integer, a logit bias
    outside the vocabulary."""
    if params.n != 1:
        raise ValueError(f"n = {params.n}: a request is one sequence; LLM.generate and the server submit the "
                         "prompt n times")
    n = len(inputs.token_ids)
    if n >= max_model_len:
        raise ValueError(f"the prompt has {n} tokens but max_model_len is {max_model_len} "
                         f"(room for at least one generated token is needed)")
    if n >= max_request_tokens:
        raise ValueError(f"the prompt has {n} tokens but the KV cache holds only {max_request_tokens} token slots, "
                         "and a request needs one more than its prompt; raise num_kv_blocks or kv_cache_memory")
    if not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if any(t >= vocab_size for t in params.logit_bias or {}):
        raise ValueError(f"logit_bias has a token id outside the vocabulary [0, {vocab_size})")
    if any(t >= vocab_size for t in params.stop_token_ids or []):  # it could never stop the request
        raise ValueError(f"stop_token_ids has a token id outside the vocabulary [0, {vocab_size})")
    if any(t >= vocab_size for t in params.allowed_token_ids or []):
        raise ValueError(f"allowed_token_ids has a token id outside the vocabulary [0, {vocab_size})")


def truncated(ids: list[int], keep: int | None, max_request_tokens: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: only the prompt's last `keep` tokens run (-1: as many as leave
    room for one generated token; None: all)."""
    if keep is None:
        return ids
    return ids[-(max_request_tokens - 1 if keep == -1 else keep):]


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids as vLLM bans them: the word at a text's start, and after a space
    where that spelling is another word of as many tokens (a byte-level BPE's " word" is)."""
    out = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out += [alone] + ([spaced] if alone and spaced[0] != alone[0] and len(spaced) == len(alone) else [])
    return [ids for ids in out if ids]
