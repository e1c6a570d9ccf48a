"""`inferlab generate` and `inferlab chat`: requests streamed to the terminal as their text is
released, a conversation kept within the model's context."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from inferlab.cli_args import engine_config, recording, sampling_params
from inferlab.outputs import RequestFailed, check_outputs
from inferlab.text import is_text, terminal_text

log = logging.getLogger("inferlab")


def _one_screen() -> bool:
    """Whether log lines (stderr) land where the answer does (stdout): a terminal, or `2>&1`."""
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError):  # no file behind one of them (a captured stream)
        return False


@contextmanager
def answer_uninterrupted() -> Iterator[None]:
    """While an answer streams where the log lines go too (a terminal, `2>&1`), routine INFO lines
    (the thread count adapting to a busy neighbour) would land in the middle of its text: they are
    held back and logged after it. Warnings go through at once."""
    if not _one_screen():
        yield
        return
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            held.append(record)
            return False
        return True

    log.addFilter(hold)
    try:
        yield
    finally:
        log.removeFilter(hold)
        for record in held:
            log.handle(record)


def stream(engine, request_id: str, prompt, params) -> str:
    """Run one request to the end, printing text as it is released; returns the whole text."""
    engine.add_request(request_id, prompt, params)
    text, out = "", None
    with answer_uninterrupted():
        try:
            while engine.has_unfinished_requests():
                for out in check_outputs(engine.step()):
                    delta = out.outputs[0].new_text
                    text += delta
                    print(delta, end="", flush=True)
        finally:
            print(flush=True)
    done = out.outputs[0] if out is not None and out.finished else None
    if done and done.finish_reason == "length" and params.max_tokens and len(done.token_ids) < params.max_tokens:
        # as vLLM's offline API, max_tokens is capped by the room the context leaves: said, not silent
        log.warning("the answer stopped at the end of the context (%d tokens: prompt %d, answer %d), before "
                    "--max-tokens %d", len(out.prompt_token_ids) + len(done.token_ids), len(out.prompt_token_ids),
                    len(done.token_ids), params.max_tokens)
    return text


def cmd_generate(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    if a.raw and a.system:
        raise ValueError("--system goes into the chat template, which --raw leaves out: use one or the other")
    if a.prompt is None and sys.stdin.isatty():
        raise ValueError("give a prompt, or - to read it from stdin")
    if a.prompt in ("-", None):  # llama-cli's -f and Ollama's pipe: the prompt from stdin
        a.prompt = terminal_text(sys.stdin.read().replace("\r\n", "\n").removesuffix("\n"))  # Windows line ends too
    if not a.prompt.strip():  # refused before the model loads (the chat template would wrap nothing)
        raise ValueError("the prompt is empty")
    params = sampling_params(a)
    params.validate()  # before the model loads
    engine = LLMEngine(engine_config(a))
    tok = engine.tokenizer
    if a.raw or not tok.chat_template:
        if not a.raw:  # said, since a --system would be dropped and the answer reads unlike a chat's
            log.warning("this model has no chat template: the prompt goes in as raw text%s",
                        ", without the --system message" if a.system else "")
        prompt = a.prompt
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                   [{"role": "user", "content": a.prompt}]
        text = tok.apply_chat_template(messages)
        prompt = {"prompt": text, "prompt_token_ids": tok.encode_chat(text)}
    with recording(engine, a.record):
        stream(engine, "generate-0", prompt, params)


def chat_prompt(tok, messages: list[dict], first: int, limit: int, answer: int) -> tuple[dict | None, int]:
    """The prompt for a conversation and how many of its oldest messages it leaves out: exchanges
    after the first `first` messages (a system message) are dropped, oldest first, until the prompt
    leaves `answer` tokens of the `limit`, or only the newest message is left. None if even that
    leaves no room to answer."""
    dropped = 0
    while True:
        kept = messages[:first] + messages[first + dropped:]
        text = tok.apply_chat_template(kept)
        ids = tok.encode_chat(text)
        if len(ids) + answer <= limit or len(kept) == first + 1:
            break
        dropped += 2  # a question and its answer
    return ({"prompt": text, "prompt_token_ids": ids} if len(ids) < limit else None), dropped


def check_system(tok, system: str, limit: int) -> None:
    """Refuse at start a --system message that leaves no room for any message in a context of `limit`
    tokens (each message was refused as too long instead, for good)."""
    ids = tok.encode_chat(tok.apply_chat_template([{"role": "system", "content": system},
                                                   {"role": "user", "content": "?"}]))
    if len(ids) >= limit:
        raise ValueError(f"--system leaves no room for a message: with one it takes {len(ids)} tokens of the "
                         f"context of {limit}; shorten it or raise --max-model-len")


HELP = """/reset   forget the conversation (the --system message stays)
/exit    quit (also /quit, /bye, Ctrl-D, or Ctrl-C twice at the prompt)
/help    this list
Ctrl-C during an answer stops it; the conversation goes on."""


def cmd_chat(a: argparse.Namespace) -> None:
    from inferlab.engine import LLMEngine
    sampling_params(a).validate()  # before the model loads, not at the first message
    engine = LLMEngine(engine_config(a))
    tok = engine.tokenizer
    if not tok.chat_template:
        raise ValueError("this model has no chat template; use `inferlab generate --raw`")
    if a.system:
        check_system(tok, a.system, engine.max_request_tokens)
    first = 1 if a.system else 0
    history = [{"role": "system", "content": a.system}] if a.system else []
    print("Chat with the model. /help lists the commands.", file=sys.stderr)
    turn, limit = 0, engine.max_request_tokens
    # the room kept for an answer when old exchanges are dropped: --max-tokens, but at most a quarter
    # of the context (a larger one would drop the whole conversation every turn; the answer may still
    # run on to the context's end)
    answer_room = min(a.max_tokens, limit // 4)
    terminal, interrupted = sys.stdin.isatty(), False
    while True:
        try:
            line = input(">>> " if terminal else "")  # piped in: stdout holds only the answers
        except EOFError:
            if terminal:
                print()
            return
        except KeyboardInterrupt:  # at the prompt: a second one in a row quits, as a slip should not
            if interrupted:
                print()
                return
            interrupted = True
            print("\n(Ctrl-C again, Ctrl-D or /exit quits)", file=sys.stderr)
            continue
        interrupted = False
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if line.strip() in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        if line.strip() == "/reset":
            history = history[:first]
            continue
        if not line.strip():
            continue
        line = terminal_text(line)
        if not is_text(line):  # bytes that are no UTF-8, read as lone surrogates: this line alone is refused
            print("error: this line is not UTF-8 text (the conversation is kept)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        prompt, dropped = chat_prompt(tok, history, first, limit, answer_room)
        if prompt is None:
            history.pop()
            print(f"error: this message does not fit the context of {limit} tokens; say it in fewer words "
                  "(the conversation is kept)", file=sys.stderr)
            continue
        if dropped:
            del history[first:first + dropped]
            print(f"(the conversation outgrew the context of {limit} tokens: the oldest {dropped // 2} "
                  f"exchange{'s' if dropped > 2 else ''} forgotten; /reset starts over)", file=sys.stderr)
        try:
            reply = stream(engine, f"chat-{turn}", prompt, sampling_params(a))
        except KeyboardInterrupt:  # stop this answer, keep the session (stream ended its line)
            engine.abort_request(f"chat-{turn}")
            reply = ""
        except RequestFailed as e:  # said (and logged); the session goes on without this exchange
            print(f"error: {e}", file=sys.stderr)
            reply = None
        turn += 1
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})
