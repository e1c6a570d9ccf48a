"""Fill in the middle (inferlab/model/fim.py): a code model's prompt for the text between a prefix
and a suffix, as each family's three tokens frame it, through OpenAI's completions `suffix` and
Ollama's /api/generate `suffix`; a vocabulary without them is told so."""
from __future__ import annotations

import httpx
import pytest
from test_server import MODEL, running_server

from inferlab import LLM, SamplingParams
from inferlab.model import fim

# three tokens of the embedded vocabulary stand for a family's prefix, suffix and middle marks
STAND_IN = ("<repo_name>", "<file_sep>", "<filename>")
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def server(smol):
    with running_server(smol, num_kv_blocks=64) as s:
        yield s


def test_each_familys_tokens_frame_prefix_suffix_middle(smol, monkeypatch):
    tok = smol[1]
    assert fim.fim_ids(tok) is None  # SmolLM2 was not trained for it
    monkeypatch.setattr(fim, "FAMILIES", [("<no_such>", "<b>", "<c>"), STAND_IN])
    pre, suf, mid = (tok.backend.token_to_id(t) for t in STAND_IN)
    assert fim.fill_prompt(tok, PREFIX, SUFFIX) == [pre, *tok.encode(PREFIX, add_special_tokens=False), suf,
                                                    *tok.encode(SUFFIX, add_special_tokens=False), mid]


def test_completions_and_ollama_fill_the_middle(server, smol, monkeypatch):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6},
                   timeout=60)
    assert r.status_code == 400 and "no fill-in-the-middle tokens" in r.json()["error"]["message"]
    monkeypatch.setattr(fim, "FAMILIES", [STAND_IN])
    ids = fim.fill_prompt(smol[1], PREFIX, SUFFIX)
    greedy = SamplingParams(max_tokens=6, temperature=0)  # the same ids by the same model: the same middle
    alone = LLM(loaded=smol, num_kv_blocks=16).generate({"prompt_token_ids": ids}, greedy,
                                                        use_tqdm=False)[0].outputs[0].text
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX,
                                                         "max_tokens": 6, "temperature": 0}, timeout=60).json()
    assert r["choices"][0]["text"] == alone and r["usage"]["prompt_tokens"] == len(ids)
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX,
                                                       "stream": False, "options": {
                                                           "num_predict": 6, "temperature": 0, "repeat_penalty": 1},
                                                       }, timeout=60)  # (Ollama's default penalty is 1.1)
    assert r.json()["response"] == alone and r.json()["prompt_eval_count"] == len(ids)
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": PREFIX, "suffix": "", "max_tokens": 1,
                                                             "temperature": 0}, timeout=60).json()
    assert plain["usage"]["prompt_tokens"] == len(smol[1].encode(PREFIX))  # an empty suffix: a plain completion
