"""Decode steps replayed from a tape of the model's forward pass give exactly what the op-by-op path
gives, step by step and over whole generations, for the embedded model and tiny Qwen2 (q/k/v biases)
and Qwen3 (q/k norms) models; steps it does not cover keep the op-by-op path; a forward pass that
computes outside the kernels is never taped."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from inferlab import LLM, SamplingParams, kernels
from inferlab.model.llama import LlamaForCausalLM, ModelArgs
from inferlab.tape import DecodeTape, plan_arena


class Checked:
    """Stands in for the runner's tape: replays it, then runs the op-by-op model on the same step,
    and records (rows, whether the hidden states are identical)."""

    def __init__(self, runner) -> None:
        self.runner, self.tape, self.steps, self.others = runner, runner.tape, [], []

    def current(self) -> bool:
        return self.tape.current()

    def covers(self, meta, num_tokens: int) -> bool:
        if self.tape.covers(meta, num_tokens):
            return True
        self.others.append(num_tokens)
        return False

    def __call__(self, input_ids, positions, meta) -> torch.Tensor:
        got = self.tape(input_ids, positions, meta).clone()
        want = self.runner.model(input_ids, positions, self.runner.kv_caches, meta)
        self.steps.append((input_ids.numel(), torch.equal(got, want)))
        return got


def _tape(runner):
    """The runner's tape. Skipped only without native kernels: a model whose forward stopped taping
    (a torch op slipped in) fails here, where a skip hid it."""
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable: decode steps run op by op")
    assert runner.tape is not None, "decode steps run op by op (the start-up log says why)"
    return runner.tape


def _check(llm: LLM, batches: list[list[list[int]]], max_tokens: int) -> Checked:
    runner = llm.engine.runner
    _tape(runner)
    runner.tape = checked = Checked(runner)
    for prompts in batches:
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=max_tokens),
                     use_tqdm=False)
    llm.engine.check_integrity()
    return checked


def test_embedded_model_decode_steps_match_op_by_op(smol, chat_prompts):
    llm = LLM(loaded=smol)
    prompts = chat_prompts[:6] + [chat_prompts[0] + [42, 43, 44]]  # the last: a short chunk over a cached prefix
    checked = _check(llm, [prompts], max_tokens=5)
    steps = checked.steps
    assert steps and all(same for _, same in steps), steps
    assert 7 in {n for n, _ in steps}, steps  # the full batch of decodes was replayed
    assert checked.others, "the prefill steps kept the op-by-op path"


def test_whole_generations_match_an_op_by_op_engine(smol, chat_prompts):
    """Separate engines, so neither path's K/V writes can cover for the other's over 24 steps."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [{"prompt_token_ids": p} for p in chat_prompts]
    taped, eager = LLM(loaded=smol), LLM(loaded=smol, enforce_eager=True)
    _tape(taped.engine.runner)
    assert eager.engine.runner.tape is None
    assert [o.outputs[0].token_ids for o in taped.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]


def test_a_profiled_replay_times_every_op_and_changes_nothing(smol, chat_prompts):
    """`op_seconds` (benchmarks/profile_step.py): each op's wall time lands in its entry, over replays."""
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = [{"prompt_token_ids": p} for p in chat_prompts[:3]]
    llm = LLM(loaded=smol)
    tape = _tape(llm.engine.runner)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    tape.op_seconds = np.zeros(len(tape.ops))
    timed = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert timed == plain
    assert (tape.op_seconds > 0).all(), "an op was not timed"
    linear = tape.ops[:, 0] == kernels.tape_ops()["linear"]
    assert linear.sum() == 4 * smol[0].args.num_layers  # q/k/v, o, gate/up, down: the lm_head is not taped
    once = tape.op_seconds.copy()
    llm.generate(prompts, params, use_tqdm=False)
    assert (tape.op_seconds > once).all()  # added to, not overwritten


def _tiny(tokenizer, qk_norm: bool, dtype: torch.dtype) -> tuple[LlamaForCausalLM, object]:
    """Two random layers, Qwen2-shaped (q/k/v biases) or Qwen3-shaped (q/k norms)."""
    torch.manual_seed(0)
    args = ModelArgs(arch="qwen3" if qk_norm else "qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=96, vocab_size=tokenizer.vocab_size, max_position=512,
                     attention_bias=not qk_norm, qk_norm=qk_norm)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(args).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, tokenizer


@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_models_match_op_by_op(smol, qk_norm, dtype):
    llm = LLM(loaded=_tiny(smol[1], qk_norm, dtype), num_kv_blocks=160, block_size=16)
    prompts = [[5 + i, 7, 11 + 3 * i, 13][:2 + i % 3] for i in range(70)]
    checked = _check(llm, [prompts[:20], prompts], max_tokens=4)  # 20 decodes, then 70: over the limit
    assert checked.steps and all(same for _, same in checked.steps), checked.steps
    assert 70 in checked.others and max(n for n, _ in checked.steps) <= 64, (checked.others, checked.steps)


def test_a_forward_that_computes_outside_the_kernels_is_not_taped(smol, caplog):
    model, tokenizer = _tiny(smol[1], False, torch.float32)
    layer = model.model.layers[1]
    original = layer.mlp.forward
    layer.mlp.forward = lambda x: original(x) * 1.0  # an edit a tape could not replay
    with caplog.at_level(logging.INFO, logger="inferlab"):
        llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64)
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable")
    assert llm.engine.runner.tape is None
    assert "decode steps run op by op" in caplog.text and "mul" in caplog.text


def test_a_forward_whose_ops_depend_on_the_rows_is_not_taped(smol, caplog):
    """Recorded at 64 rows alone, the tape would replay the 64-row branch at every row count, which the
    op-by-op model does not run: a silent difference in every decode step of fewer rows."""
    model, tokenizer = _tiny(smol[1], False, torch.float32)
    layer = model.model.layers[1]
    original = layer.mlp.forward
    layer.mlp.forward = lambda x: original(x) if x.shape[0] > 32 else original(original(x))
    with caplog.at_level(logging.INFO, logger="inferlab"):
        llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64)
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable")
    assert llm.engine.runner.tape is None
    assert "other ops, or other constants, at 1 row than at 64" in caplog.text


@pytest.mark.parametrize("edit", [
    lambda y: torch.clamp(y, -0.05, 0.05, out=y), lambda y: torch.nn.functional.relu(y, inplace=True),
    lambda y: torch.nn.functional.silu(y, True)], ids=["out", "inplace", "inplace-positional"])
def test_a_forward_writing_in_place_through_torch_is_not_taped(smol, caplog, edit):
    """Its output lands in an input's memory: computed once while recording, never replayed."""
    model, tokenizer = _tiny(smol[1], False, torch.float32)
    layer = model.model.layers[1]
    original = layer.mlp.forward
    layer.mlp.forward = lambda x: edit(original(x))
    with caplog.at_level(logging.INFO, logger="inferlab"):
        llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64)
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable")
    assert llm.engine.runner.tape is None and "decode steps run op by op" in caplog.text


def test_native_attention_asked_for_heads_it_cannot_take_says_which_limit(smol):
    if kernels.native() is None:
        pytest.skip("the native kernels are unavailable")
    torch.manual_seed(0)
    args = ModelArgs(arch="llama", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=320,
                     intermediate_size=96, vocab_size=smol[1].vocab_size, max_position=512)
    loaded = (LlamaForCausalLM(args).eval(), smol[1])
    with pytest.raises(ValueError, match=r"^attention_backend 'native' cannot run this model: head_dim 320 is "
                                         r"over the kernels' 256$"):  # not "needs a C compiler"
        LLM(loaded=loaded, num_kv_blocks=16, attention_backend="native", dtype="float32")
    llm = LLM(loaded=loaded, num_kv_blocks=16, dtype="float32")  # auto: PyTorch's attention
    out = llm.generate([[5, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]  # sampled: EOS too
    assert llm.engine.runner.native is None and len(out.outputs[0].token_ids) == 3


def test_a_replaced_parameter_is_recorded_again(smol):
    """`p.data = ...` after start: the tape's recorded addresses would point at freed memory; the
    runner records again and the decode steps use the new weights, as op by op does."""
    params = SamplingParams(temperature=0, max_tokens=6)
    prompt = [{"prompt_token_ids": [5, 7, 11, 13]}]
    outputs = []
    for eager in (False, True):
        model, tokenizer = _tiny(smol[1], False, torch.float32)
        llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64, enforce_eager=eager)
        if not eager:
            _tape(llm.engine.runner)
        before = llm.engine.runner.tape
        llm.generate(prompt, params, use_tqdm=False)
        for layer in model.model.layers:  # new memory, new values; the old memory is freed
            layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data * -2.0
        outputs.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
        if not eager:
            assert llm.engine.runner.tape is not before and llm.engine.runner.tape.current()
    assert outputs[0] == outputs[1]


def test_enforce_eager_runs_the_python_model(smol):
    model, tokenizer = _tiny(smol[1], False, torch.float32)
    llm = LLM(loaded=(model, tokenizer), num_kv_blocks=64, enforce_eager=True)
    assert llm.engine.runner.tape is None
    calls = []
    model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))  # an edit to the Python model
    llm.generate([{"prompt_token_ids": [5, 7, 11]}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(calls) == 4  # the prefill step and three decode steps all ran it


def test_arena_reuses_memory_by_liveness():
    # three temporaries of 100 bytes: the first dies before the third is born, the second lives on
    offsets, size = plan_arena({1: [100, 0, 1, None], 2: [100, 1, 5, None], 3: [100, 2, 3, None]})
    assert offsets[3] == offsets[1] != offsets[2] and size == 256


def test_the_embedded_models_arena_holds_about_one_layer(smol):
    tape: DecodeTape = _tape(LLM(loaded=smol).engine.runner)
    args = smol[0].args
    per_layer = 64 * 4 * (args.hidden_size * 5 + (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
                          + args.num_heads * args.head_dim + 3 * args.intermediate_size)
    assert tape.arena.numel() < 2 * per_layer, (tape.arena.numel(), per_layer)


@pytest.mark.skipif(kernels.native() is None, reason="the native kernels are unavailable")
def test_every_entry_point_is_a_tape_op_without_code_for_it():
    """The tape's calls are generated from api.h, so an entry point no model records (argmax) replays
    with its arguments where its prototype puts them: the step's rows, a constant, a pointer."""
    k = kernels.native()
    x = torch.randn(5, 300)
    out = torch.full((5,), -1, dtype=torch.int64)
    entry = np.zeros(kernels.C["IL_TAPE_WIDTH"], dtype=np.int64)
    args = [(kernels.C["IL_ARG_PTR"], out.data_ptr()), (kernels.C["IL_ARG_PTR"], x.data_ptr()),
            (kernels.C["IL_ARG_ROWS"], 0), (kernels.C["IL_ARG_CONST"], 300),
            (kernels.C["IL_ARG_CONST"], kernels.DTYPE_CODES[torch.float32]), (kernels.C["IL_ARG_THREADS"], 0)]
    entry[:2] = kernels.tape_ops()["argmax"], k.address("argmax")
    entry[2:2 + 2 * len(args)] = np.array(args).ravel()
    rows = 3  # the replay's rows, not the recording's: the last two rows stay unwritten
    assert k.tape_run(torch.from_numpy(entry), 1, torch.zeros(1, dtype=torch.int64), None, rows, 0, None) == 0
    assert out[:rows].tolist() == x[:rows].argmax(-1).tolist() and out[rows:].tolist() == [-1, -1]
    assert set(kernels.tape_ops()) == set(kernels.prototypes()) - {"tape_run", "x16_products", "cpu_features"}
