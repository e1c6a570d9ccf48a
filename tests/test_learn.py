"""The docs/learn chapter scripts show what their chapters say: the out-of-KV-memory crash and
the same load finishing paged, swap and recompute agreeing, priority preemption, cache hits
through the trie. They run in this process on the tiny model (with the embedded tokenizer): what
they show is scheduling, which depends on the prompts and the knobs, not on the model's words;
the chapters quote their output on the embedded model."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from inferlab.scope.recorder import read_trace

LEARN = Path(__file__).resolve().parent.parent / "docs" / "learn"


@pytest.fixture(scope="module")
def chapter(tiny):
    sys.path.insert(0, str(LEARN))
    import lesson
    lesson.model.cache_clear()
    original = lesson.model
    lesson.model = lambda: tiny

    def run(name: str, capsys, monkeypatch, *args: str) -> str:
        spec = importlib.util.spec_from_file_location(f"chapter_{name}", LEARN / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
        module.main()
        return capsys.readouterr().out
    yield run
    lesson.model = original
    sys.path.remove(str(LEARN))


def test_the_chapters_load_the_model_in_fp32_as_their_transcripts_were_made(smol):
    """bf16 (auto's choice on a CPU with bf16 instructions) answers some questions in other words, and the
    chapters' quoted runs then preempt at other steps."""
    sys.path.insert(0, str(LEARN))
    try:
        import lesson
        model, _ = lesson.model.__wrapped__()
    finally:
        sys.path.remove(str(LEARN))
    assert model.dtype == torch.float32 == smol[0].dtype


def test_chapter_1_reserving_crashes_where_paging_finishes(chapter, capsys, monkeypatch):
    out = chapter("1_reserve", capsys, monkeypatch)
    assert "request d: out of KV memory: request 'd' reserves 4 blocks" in out
    assert "finished 3 of 6 questions; the rest were refused" in out
    assert "finished 6 of 6 questions" in out


def test_chapter_2_swap_and_recompute_agree(chapter, capsys, monkeypatch):
    out = chapter("2_paging", capsys, monkeypatch)
    assert "outputs identical under recompute and swap: True" in out
    assert "preempt " in out and "blocks copied to the host" in out and "blocks copied back" in out


def recorded(path: Path) -> tuple[list[int], set[str]]:
    """The steps a recording holds and the requests seen in it."""
    frames = [json.loads(line) for line in read_trace(str(path))[1]]
    return [f["step"] for f in frames], {r["id"] for f in frames for r in f["requests"]}


def test_chapter_3_priority_starts_the_urgent_request_sooner(chapter, capsys, monkeypatch, tmp_path):
    out = chapter("3_priority", capsys, monkeypatch, "--record", str(tmp_path / "priority.jsonl"))
    fcfs, priority = (int(n) for n in re.findall(r"u's first token at step (\d+)", out))
    assert priority == 5 < fcfs  # the step after it arrived, by preempting a background request
    assert "waiting heap (key, request): [((0, 4.0, 4), 'u')]" in out
    steps, requests = recorded(tmp_path / "priority.jsonl")  # the whole priority run, from step 1
    assert steps == list(range(1, len(steps) + 1)) and requests == {"a", "b", "c", "d", "u"}


def test_chapter_4_the_trie_finds_the_shared_system_prompt(chapter, capsys, monkeypatch, tmp_path):
    out = chapter("4_prefix", capsys, monkeypatch, "--record", str(tmp_path / "radix.jsonl"))
    steps, requests = recorded(tmp_path / "radix.jsonl")  # a's run, then b, c, d finding its blocks
    assert steps == list(range(1, len(steps) + 1)) and requests == {"a", "b", "c", "d"}
    assert "same outputs: True, same hits: True, the tree's node names are the chain hashes: True" in out
    assert "b: 48 of 69 cached" in out and "(4 children)" in out
