"""Bad input gets a clear one-line error and harms nobody: no leak, no crash, others unaffected."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inferlab import EngineConfig, SamplingParams


def drain(engine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_too_long_prompts_rejected_while_others_are_served(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=8, block_size=4, max_model_len=64)  # pool: 32 tokens
    engine.add_request("ok-1", {"prompt_token_ids": [300] * 10}, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="KV cache holds only"):
        engine.add_request("big", {"prompt_token_ids": [300] * 40}, SamplingParams(max_tokens=5))
    engine2 = make_tiny_engine(num_kv_blocks=64, block_size=4, max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len is 16"):
        engine2.add_request("ctx", {"prompt_token_ids": [300] * 16}, SamplingParams(max_tokens=5))
    engine.add_request("ok-2", {"prompt_token_ids": [301] * 6}, SamplingParams(max_tokens=5, ignore_eos=True))
    done = drain(engine)
    assert set(done) == {"ok-1", "ok-2"} and all(len(t) == 5 for t in done.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generation_stops_at_the_context_limit(make_tiny_engine):
    engine = make_tiny_engine(num_kv_blocks=64, block_size=4, max_model_len=20)
    engine.add_request("r", {"prompt_token_ids": [300] * 15}, SamplingParams(max_tokens=100, ignore_eos=True))
    assert len(drain(engine)["r"]) == 5  # 15 + 5 = max_model_len


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, -3]}, "outside the vocabulary"),
    ({"prompt_token_ids": [1, 10**9]}, "outside the vocabulary"),
    ({"prompt_token_ids": "abc"}, "list of integers"),
    ({"foo": 1}, "prompt_token_ids"),
    ({"prompt": "hi", "multi_modal_data": {"image": b""}}, "multi_modal_data: this model reads text only"),
    ({"prompt_token_ids": [1, 2], "max_tokens": 3}, "a prompt dict takes prompt, prompt_token_ids and cache_salt, "
                                                    "not 'max_tokens'"),
    (3.5, "prompt must be"),
])
def test_bad_prompts_refused_without_side_effects(make_tiny_engine, prompt, message):
    engine = make_tiny_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, SamplingParams(max_tokens=3))
    assert not engine.has_unfinished_requests() and not engine.requests
    engine.add_request("bad", "hello", SamplingParams(max_tokens=2, ignore_eos=True))  # id is free again
    assert len(drain(engine)["bad"]) == 2


def test_duplicate_request_id_refused(make_tiny_engine):
    engine = make_tiny_engine()
    engine.add_request("x", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", "hello again", SamplingParams(max_tokens=2))


def test_abort_frees_blocks_and_spares_the_others(make_tiny_engine):
    ref = make_tiny_engine()
    ref.add_request("keep", {"prompt_token_ids": [400] * 9}, SamplingParams(temperature=0, max_tokens=8))
    expected = drain(ref)["keep"]
    engine = make_tiny_engine()
    engine.add_request("keep", {"prompt_token_ids": [400] * 9}, SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("drop", {"prompt_token_ids": [500] * 30}, SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    assert engine.abort_request("drop")
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks < used
    assert not engine.abort_request("drop") and not engine.abort_request("never-existed")
    assert drain(engine)["keep"] == expected
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_llm_generate_rejects_a_bad_batch_whole(make_llm):
    llm = make_llm(num_kv_blocks=32)
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate(["fine", "", "also fine"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 32
    assert len(llm.generate("fine", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)) == 1


def test_chat_rejects_malformed_messages(make_llm):
    llm = make_llm(num_kv_blocks=32)
    for messages in ({"role": "user", "content": "hi"}, None):  # was KeyError: 0 / not subscriptable
        with pytest.raises(ValueError, match="messages must be a list of messages"):
            llm.chat(messages, use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\] must be a \{'role'"):
        llm.chat([{"content": "no role"}], use_tqdm=False)
    with pytest.raises(ValueError, match="messages must be a non-empty list"):  # one conversation, empty
        llm.chat([[]], use_tqdm=False)  # (no conversations at all, chat([]), is no outputs: [])
    with pytest.raises(ValueError, match=r"messages\[1\]\.content\[0\]: only text parts .*'image_url'"):
        llm.chat([{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[0\]\.content must be text"):
        llm.chat([{"role": "user", "content": 5}], use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == 32


def test_chat_takes_openais_text_parts_as_the_server_does(make_llm):
    """Content parts are joined (vLLM's LLM.chat and the server take them); null content is empty."""
    llm = make_llm(num_kv_blocks=64)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    plain = llm.chat([{"role": "user", "content": "What is 2+2?"}], greedy, use_tqdm=False)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "What is "},
                                                   {"type": "text", "text": "2+2?"}]}], greedy, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids and parts.outputs[0].text == plain.outputs[0].text
    empty = llm.chat([{"role": "user", "content": None}], greedy, use_tqdm=False)[0]
    assert empty.prompt_token_ids == llm.chat([{"role": "user", "content": ""}], greedy,
                                              use_tqdm=False)[0].prompt_token_ids


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),  # ran to the context's end
    ("temperature", -1.0, r"temperature must be in \[0, 100\], got -1.0"),  # ran greedy
    ("n", 0, "n must be an integer >= 1, got 0"),  # an IndexError
])
def test_sampling_params_changed_after_construction_are_checked_again(make_llm, field, value, message):
    llm = make_llm(num_kv_blocks=32)
    sp = SamplingParams(max_tokens=4)
    setattr(sp, field, value)
    with pytest.raises(ValueError, match=f"^prompt 0: {message}$"):
        llm.generate(["hi"], sp, use_tqdm=False)
    with pytest.raises(ValueError, match=f"^{message}$"):
        llm.engine.add_request("r", "hi", sp)
    assert llm.engine.block_manager.num_free_blocks == 32 and not llm.engine.has_unfinished_requests()
    assert SamplingParams(bad_words=[]).max_tokens == 16  # asks for nothing, as the server takes it


def test_sampling_params_of_another_type_are_named(make_llm):
    """A dict or a string was an AttributeError ('dict' object has no attribute 'validate'); a tuple of
    SamplingParams (vLLM takes any sequence) was refused the same way."""
    llm = make_llm(num_kv_blocks=32)
    for prompts, params in (("a", {"max_tokens": 3}), ("a", "greedy"), (["a"], [{"max_tokens": 3}])):
        with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them, got "):
            llm.generate(prompts, params, use_tqdm=False)
    with pytest.raises(TypeError, match="params must be a SamplingParams or a PoolingParams, not dict"):
        llm.engine.add_request("x", "hi", {"max_tokens": 3})
    out = llm.generate(["a", "b"], (SamplingParams(max_tokens=2, ignore_eos=True),) * 2, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [2, 2]
    assert llm.engine.block_manager.num_free_blocks == 32


@pytest.mark.parametrize("bias, message", [([1, 2], "logit_bias must be a dict of token id to bias, got list"),
                                           ({1: True}, "logit_bias values must be numbers")])
def test_a_logit_bias_of_the_wrong_shape_is_one_line(bias, message):
    with pytest.raises(ValueError, match=message):  # a list was AttributeError: no attribute 'values'
        SamplingParams(logit_bias=bias).validate()


def test_the_tokenizer_names_what_it_cannot_take(smol):
    """decode([-1]) was an OverflowError from the Rust side, decode([1.5]) the text of token 1, and
    encode(None) an AttributeError."""
    tok = smol[1]
    for ids in ([-1], [1.5], [tok.backend.get_vocab_size(with_added_tokens=True)], torch.tensor([0.5])):
        with pytest.raises(ValueError, match="decode: .* is no token id in"):
            tok.decode(ids)
    for call, arg in ((tok.decode, None), (tok.encode, None), (tok.encode, 5), (tok, [1, 2])):
        with pytest.raises(TypeError):
            call(arg)
    assert tok.decode(torch.tensor([[28, 1425]])) == tok.decode([28, 1425]) != ""  # a tensor of ids still decodes


def test_an_on_off_variable_refuses_other_words(monkeypatch):
    """INFERLAB_MODEL_CACHE=bogus was read as on, where INFERLAB_NATIVE=maybe was refused."""
    from inferlab.model import weight_cache
    from inferlab.switches import env_switch
    for word, on in (("0", False), ("no", False), ("Off", False), ("1", True), ("yes", True), ("", True)):
        monkeypatch.setenv("INFERLAB_MODEL_CACHE", word)
        assert env_switch("INFERLAB_MODEL_CACHE") is on
    monkeypatch.setenv("INFERLAB_MODEL_CACHE", "bogus")
    with pytest.raises(ValueError, match="INFERLAB_MODEL_CACHE=bogus: 0 \\(off\\) or 1 \\(on\\)"):
        weight_cache._entry(__file__)
    from inferlab.model.loader import load_model
    with pytest.raises(ValueError) as e:  # the setting's error, not "cannot load <the model file>"
        load_model(None, "float32", torch.device("cpu"))
    assert str(e.value).startswith("INFERLAB_MODEL_CACHE=bogus")


@pytest.mark.parametrize("field", ["ignore_eos", "include_stop_str_in_output"])
def test_a_switch_takes_true_or_false_only(field):
    with pytest.raises(ValueError, match=f"{field} must be True or False, got 'no'"):  # "no" read as true
        SamplingParams(**{field: "no"})


@pytest.mark.parametrize("swap_space", [float("inf"), float("nan"), -1.0])
def test_swap_space_must_be_finite(swap_space):
    with pytest.raises(ValueError, match="swap_space must be a number of GiB, >= 0 and finite"):  # inf: OverflowError
        EngineConfig(swap_space=swap_space)


def test_a_bad_log_level_warns_and_keeps_info():
    """INFERLAB_LOG_LEVEL=bogus made `import inferlab` (and so every command) a traceback."""
    env = {**os.environ, "INFERLAB_LOG_LEVEL": "bogus"}
    r = subprocess.run([sys.executable, "-c", "import logging, inferlab; print(logging.getLogger('inferlab').level)"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "20", r.stderr
    assert "INFERLAB_LOG_LEVEL='BOGUS' is no logging level" in r.stderr
    env["INFERLAB_LOG_LEVEL"] = "15"
    r = subprocess.run([sys.executable, "-c", "import logging, inferlab; print(logging.getLogger('inferlab').level)"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == "15", r.stderr


def test_llm_generate_takes_priorities_as_a_list(make_llm):
    llm = make_llm(num_kv_blocks=32)
    with pytest.raises(ValueError, match=r"^priority must be a list of integers, one a prompt \(vLLM's\), got 5$"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), priority=5, use_tqdm=False)
    with pytest.raises(ValueError, match="got 2 priorities for 1 prompts"):
        llm.generate(["hi"], SamplingParams(max_tokens=2), priority=[1, 2], use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == 32 and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompts", [None, 5, [None], [["a"]]])
def test_llm_generate_names_what_a_prompt_can_be(make_llm, prompts):
    llm = make_llm(num_kv_blocks=32)
    with pytest.raises(ValueError, match="prompt 0: prompt must be a string, a list of token ids or a dict"):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == 32 and not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"kv_cache_memory": -1}, "kv_cache_memory"),
    ({"scheduling_policy": "lifo"}, "scheduling_policy"),
    ({"dtype": "int8"}, "dtype"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"max_model_len": 1}, "max_model_len"),
    ({"device": "tpu"}, "device must be cpu or cuda"),
    *([({"device": "cuda"}, "PyTorch sees no GPU here")] if not torch.cuda.is_available() else []),
    ({"max_model_len": "2048"}, "max_model_len must be int or None, got '2048'"),
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching must be bool, got 'yes'"),
    ({"block_size": True}, "block_size must be int, got True"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory: expected a size in bytes"),
    ({"seed": 1.5}, "seed must be int or None"),
    ({"sjf_aging_rate": float("nan")}, "sjf_aging_rate must be a finite number >= 0, got nan"),
    ({"sjf_aging_rate": float("inf")}, "sjf_aging_rate must be a finite number >= 0, got inf"),
    ({"sjf_aging_rate": -1.0}, "sjf_aging_rate must be a finite number >= 0, got -1.0"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_config_takes_sizes_and_vllms_dtype_names():
    assert EngineConfig(kv_cache_memory="64MiB").kv_cache_memory == 64 << 20
    assert (EngineConfig(dtype="half").dtype, EngineConfig(dtype="float").dtype) == ("float16", "float32")
    assert EngineConfig(dtype=torch.bfloat16).dtype == "bfloat16"


@pytest.mark.parametrize("kwargs, message", [
    ({"gpu_memory_utilization": 0.9}, "LLM\\(\\) takes no argument 'gpu_memory_utilization': the KV pool is sized by"),
    ({"trust_remote_code": True}, "takes no argument 'trust_remote_code': InferLab runs no code from a checkpoint"),
    ({"colour": "blue"}, "takes no argument 'colour': see EngineConfig"),
])
def test_llm_names_an_argument_it_does_not_take(smol, kwargs, message):
    from inferlab import LLM
    with pytest.raises(ValueError, match=message):
        LLM(loaded=smol, **kwargs)


def test_an_engine_seed_repeats_the_sampled_outputs_of_requests_without_one(make_tiny_engine):
    def run(seed):
        engine = make_tiny_engine(seed=seed)
        for i in range(3):
            engine.add_request(f"r{i}", {"prompt_token_ids": [300 + i] * 5},
                               SamplingParams(max_tokens=8, ignore_eos=True))
        return drain(engine)
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("kwargs, message", [
    ({"stop": 5}, "stop must be a non-empty string or a list of non-empty strings, got 5"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of non-negative integers, got 5"),
    ({"stop_token_ids": [True]}, "stop_token_ids must be a list of non-negative integers"),
])
def test_sampling_params_name_a_list_field_given_something_else(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_logprobs": -1}, r"^prompt_logprobs must be in \[0, 20\], got -1$"),  # vLLM's -1 (the vocabulary)
    ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens=False .* as the tokenizer decodes"),
    ({"best_of": 3}, "best_of=3 .* ask for n completions"),
    ({"temprature": 0.5}, "SamplingParams takes no argument 'temprature'"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids .*, got '5'"),
])
def test_vllm_sampling_fields_are_taken_at_the_value_run_else_one_line(kwargs, message):
    """Ported scripts pass vLLM's fields, often at their defaults: those are taken, the others say what
    to do instead (it was Python's "unexpected keyword argument")."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
    p = SamplingParams(best_of=None, skip_special_tokens=True, spaces_between_special_tokens=True, detokenize=True,
                       prompt_logprobs=None, max_tokens=3)
    assert p.max_tokens == 3 and p == SamplingParams(max_tokens=3)


def test_the_vllm_shaped_engine_calls_of_a_ported_script(make_tiny_engine, make_llm):
    """`stop` set after construction counts (it was read once, at construction); add_request's fourth
    argument is arrival_time and abort_request takes a list of ids, as vLLM's; prompts may come as a
    tuple."""
    engine = make_tiny_engine()
    free = engine.block_manager.num_free_blocks
    engine.add_request("a", {"prompt_token_ids": [300] * 5}, SamplingParams(max_tokens=8, ignore_eos=True), 12.5)
    engine.add_request("b", {"prompt_token_ids": [301] * 5}, SamplingParams(max_tokens=8, ignore_eos=True))
    assert engine.requests["a"].arrival_time == 12.5
    engine.step()
    engine.abort_request(["a", "b", "gone"])
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == free
    llm = make_llm()
    plain = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop = plain.text.split()[1]
    params = llm.get_default_sampling_params()
    params.temperature, params.max_tokens, params.stop = 0, 12, [stop]
    outs = llm.generate(("The sky is", "The sky is"), params, use_tqdm=False)
    assert [o.outputs[0].stop_reason for o in outs] == [stop] * 2 and stop not in outs[0].outputs[0].text
    assert outs[0].prompt_logprobs is None and outs[0].outputs[0].finished()  # vLLM's attributes, read by scripts


def test_max_model_len_beyond_the_model_is_refused(make_tiny_engine):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        make_tiny_engine(max_model_len=10**6)


def test_pool_sized_from_memory_budget(make_tiny_engine):
    from inferlab.kv_pool import kv_bytes_per_block
    engine = make_tiny_engine(num_kv_blocks=None, kv_cache_memory=1 << 20)
    per_block = kv_bytes_per_block(engine.model.args, 4, engine.dtype)
    assert engine.block_manager.num_blocks == (1 << 20) // per_block
    with pytest.raises(ValueError, match="less than one block"):
        make_tiny_engine(num_kv_blocks=None, kv_cache_memory=10)
    # past the RAM: refused at once (1e15 bytes built the bookkeeping of 2.7e9 blocks until memory ran out)
    from inferlab.kv_pool import physical_memory
    with pytest.raises(ValueError, match=r"is more than the [\d.]+ GiB of memory this process may use"):
        make_tiny_engine(num_kv_blocks=None, kv_cache_memory=10**15)
    with pytest.raises(ValueError, match=r"GiB of memory this process may use"):
        make_tiny_engine(num_kv_blocks=physical_memory() // per_block + 1)


def test_a_request_that_breaks_the_engine_fails_alone(make_tiny_engine, monkeypatch):
    import inferlab.runner as runner_mod
    ref = make_tiny_engine()
    ref.add_request("good", {"prompt_token_ids": [600] * 7}, SamplingParams(temperature=0, max_tokens=6))
    expected = drain(ref)["good"]

    real_sample = runner_mod.sample

    def sample(logits, reqs, eos):  # a fault that only this one request triggers
        if any(r.request_id == "poison" for r in reqs):
            raise RuntimeError("boom")
        return real_sample(logits, reqs, eos)

    monkeypatch.setattr(runner_mod, "sample", sample)
    engine = make_tiny_engine()
    engine.add_request("good", {"prompt_token_ids": [600] * 7}, SamplingParams(temperature=0, max_tokens=6))
    engine.add_request("poison", {"prompt_token_ids": [700] * 5}, SamplingParams(max_tokens=6))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.check_integrity()
    assert finals["poison"].outputs[0].finish_reason == "error" and "boom" in finals["poison"].error
    assert finals["good"].outputs[0].token_ids == expected and finals["good"].error is None
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_lone_surrogate_prompt_is_a_clear_error(make_tiny_engine):
    engine = make_tiny_engine()
    with pytest.raises(ValueError, match="not valid Unicode"):
        engine.add_request("s", "bad \ud800 text", SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()


def test_a_policy_that_refuses_a_request_holds_nothing_for_it(make_tiny_engine, tmp_path):
    """Its key() raising at admission (after the start-up check passed) must not keep the request's
    KV reservation: the pool would shrink by one request each time."""
    path = tmp_path / "picky.py"
    path.write_text("from inferlab.policy import RequestQueue\n"
                    "class Picky(RequestQueue):\n"
                    "    def key(self, req):\n"
                    "        if req.priority == 13:\n"
                    "            raise ValueError('unlucky')\n"
                    "        return (req.arrival_time, req.seq)\n")
    engine = make_tiny_engine(scheduling_policy=f"{path}:Picky", kv_allocation="reserve")
    with pytest.raises(ValueError, match="unlucky"):
        engine.add_request("r", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8), priority=13)
    assert engine.scheduler.allocation.reserved == 0
    engine.add_request("ok", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()


@pytest.mark.parametrize("arrival_time", ["now", float("nan"), True])
def test_a_bad_arrival_time_is_refused_and_the_queue_keeps_working(make_tiny_engine, tmp_path, arrival_time):
    """Pushed into the waiting heap, "now" failed to compare with the others' times mid-sift and stayed
    there: every later request was refused, then a step failed (IndexError) and a block leaked. A
    policy's key that does not compare must leave the heap as it was, too."""
    plain = make_tiny_engine()
    for i in range(3):
        plain.add_request(f"w{i}", {"prompt_token_ids": [1, 2, 3 + i]}, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="arrival_time must be a finite number of seconds"):
        plain.add_request("bad", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2), arrival_time=arrival_time)
    path = tmp_path / "odd.py"
    path.write_text("from inferlab.policy import RequestQueue\n"
                    "class Odd(RequestQueue):\n"
                    "    def key(self, req):\n"
                    "        return ('x',) if req.priority == 13 else (req.arrival_time, req.seq)\n")
    odd = make_tiny_engine(scheduling_policy=f"{path}:Odd")
    for engine in (plain, odd):
        for i in range(3, 6):
            engine.add_request(f"w{i}", {"prompt_token_ids": [1, 2, 3 + i]}, SamplingParams(max_tokens=2))
        if engine is odd:
            with pytest.raises(ValueError, match="the scheduling policy refused request 'bad'"):
                engine.add_request("bad", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=2), priority=13)
        done = set()
        while engine.has_unfinished_requests():
            done |= {o.request_id for o in engine.step() if o.finished}
        assert done == {f"w{i}" for i in (range(6) if engine is not odd else range(3, 6))}
        engine.check_integrity()


@pytest.mark.parametrize("text", ['{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["zz", "q"]]}}', "{"])
def test_a_damaged_tokenizer_json_is_one_line(tmp_path, text):
    """The tokenizers library raises a bare Exception with its own text: it came out as a traceback."""
    from inferlab.model.tokenizer import Tokenizer
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(ValueError, match=r"cannot read .*tokenizer\.json: ") as e:
        Tokenizer.from_folder(str(tmp_path), {})
    assert "\n" not in str(e.value)
