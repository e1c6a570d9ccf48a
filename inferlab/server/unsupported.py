"""The fields of OpenAI's and vLLM's request bodies that would change the answer and that this
server does not implement: each one's reason for a 400, and the values that ask for nothing."""
from __future__ import annotations

# Output-changing fields of OpenAI's and vLLM's APIs that this server does not implement: the reason
# each is refused. A field is let through only with its do-nothing value (see `harmless`).
UNSUPPORTED = {
    "best_of": "best_of is not supported; ask for n choices instead",
    "functions": "functions are OpenAI's old name: send tools",
    "function_call": "function_call is OpenAI's old name: send tool_choice",
    "use_beam_search": "use_beam_search is not supported",
    "echo": "echo is not supported on chat",
    "chat_template": "chat_template is not supported: the model's own template is applied",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
    "add_special_tokens": "add_special_tokens {value} is not supported here: the prompt is tokenized as this "
                          "endpoint does by default",
    "logits_processors": "logits_processors are not supported; logit_bias can ban or favour tokens",
    "length_penalty": "length_penalty is beam search's, which is not supported",
    "documents": "documents are not supported: the chat template is given the messages only",
    # llama.cpp server's own names, which its users' clients send
    "n_predict": "n_predict is llama.cpp's name: send max_tokens",
    "repeat_penalty": "repeat_penalty is llama.cpp's name: send repetition_penalty",
    "typical_p": "typical_p is not supported",
    "mirostat": "mirostat is not supported",
}
# the one value of a field above that asks for nothing beyond plain generation, where that is not a falsy one
NEUTRAL = {"best_of": 1, "repeat_penalty": 1.0,
           "typical_p": 1.0, "length_penalty": 1.0}


def harmless(name: str, value: object, fields: dict, neutral: dict | None = None) -> bool:
    """Whether an UNSUPPORTED field holds a value that asks for nothing beyond plain generation
    (`neutral`: an endpoint's own such values, over NEUTRAL's)."""
    neutral = {**NEUTRAL, **(neutral or {})}
    if name in neutral:
        return value is None or value == neutral[name]
    return value in (None, False, "", [], {})
