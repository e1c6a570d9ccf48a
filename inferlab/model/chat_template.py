"""Chat templates: a conversation's messages checked and made text, then rendered by the model's
Jinja template in a sandbox with the globals Hugging Face templates use."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    pass


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def render(chat_template: str | None, messages: list[dict], add_generation_prompt: bool,
           template_kwargs: dict | None, bos_token: str | None, eos_token: str | None) -> str:
    """The conversation as `chat_template` writes it (None: the model has none)."""
    if not chat_template:
        raise ChatTemplateError("this model has no chat template; send raw prompts instead (LLM.generate, "
                                "/v1/completions)" if chat_template is None else "the chat_template given is empty")
    reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(template_kwargs or {})
    if reserved:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(chat_template)
        return template.render(**(template_kwargs or {}), messages=messages,
                               add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "")
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ArithmeticError) as e:  # Python's, from
        # the template's own expressions, e.g. a string concatenated with a tool call's arguments, which are an
        # object, or a range past the sandbox's limit (OverflowError)
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None


def text_messages(messages: object) -> list[dict]:
    """The conversation with every message's content as text, as the server reads it: OpenAI's
    content parts (`{"type": "text", "text": ...}`) joined, null content empty (an assistant turn that
    only called tools); other parts (images, audio) refused, as this model reads text only."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"messages[{i}] must be a {{'role': str, 'content': str}} dict")
        content = m["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatTemplateError(f"messages[{i}].content[{j}]: only text parts with their text are "
                                            f"supported (this model reads text only), got {kind!r}")
            m = {**m, "content": "".join(part["text"] for part in content)}
        elif content is None:
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be text or a list of text parts, "
                                    f"not {type(content).__name__}")
        out.append(m)
    return out


def cut_after(text: str, content: str) -> str:
    """`text` up to the end of its last occurrence of `content` (templates may strip it: then of its
    stripped form), dropping what closes the turn."""
    for piece in (content, content.strip()):
        at = text.rfind(piece)
        if at >= 0:
            return text[:at + len(piece)]
    raise ChatTemplateError("continue_final_message: the chat template does not write the last message as given")
