"""Tensor parallelism: the split layers rebuild the whole one, greedy output with several ranks equals
one rank's token for token (fp32; batched, prefix caching, chunked prefill, preemption), across two
"nodes" on loopback, behind the server; and failures are clear and leave no process behind.

In-process tests check the layers' arithmetic, each rank built in turn without communication. The
rest start real ranks over gloo on tiny random Qwen2 (qkv bias), Qwen3 (q/k norm) and tied Llama
checkpoints, and the embedded model (9 heads and 3 KV heads: 3 ranks). Every test that starts
processes checks at teardown that none is left, and kills any it finds.
"""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import httpx
import openai
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from test_hf_models import build_checkpoint, train_tokenizer
from test_moe_models import build as build_moe
from test_server import _free_port

from inferlab import LLM, EngineConfig, SamplingParams, kv_pool
from inferlab.async_engine import AsyncEngine
from inferlab.distributed import EngineDeadError, TensorParallelGroup, building
from inferlab.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from inferlab.model.layers import Embedding, Linear, quant
from inferlab.model.llama import LlamaForCausalLM, ModelArgs
from inferlab.server.app import build_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """A driver takes its rank's share of the cores (process-wide): give the other modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- the layers, rank by rank in this process ---------------------------------------------------

def ranks(size: int, make):
    """`make()` built once per rank of a group of `size` (no process group: nothing communicates)."""
    out = []
    for r in range(size):
        with building(TensorParallelGroup(r, size)):
            out.append(make())
    return out


def loaded(layer, data, wtype=None, shards=None, bias=None):
    if shards is None:
        layer.weight_loader(layer.weight, data, None, wtype)
    else:
        for i, part in enumerate(shards):
            layer.weight_loader(layer.weight, part, i, wtype)
    if bias is not None:
        layer.bias_loader(layer.bias, bias, None)
    layer.process_weights_after_loading("auto", torch.float32, isa="generic")  # kept as stored
    return layer


@pytest.mark.parametrize("wtype", [quant.F32, quant.Q8_0, quant.Q4_1, quant.Q4_K], ids=lambda t: t.name)
def test_split_layers_rebuild_the_whole_one(wtype):
    """Column shards side by side and row shards summed give the unsplit layer's output, for float
    weights and for quantized blocks cut at block boundaries (as stored: nothing requantized)."""
    k, x = 512, torch.randn(3, 512)
    shards = [quant.random_stored(wtype, 64, k, 1), quant.random_stored(wtype, 32, k, 2),
              quant.random_stored(wtype, 32, k, 3)]
    y = loaded(Linear(k, [64, 32, 32]), None, wtype, shards)(x)
    cols = [loaded(c, None, wtype, shards) for c in ranks(2, lambda: ColumnParallelLinear(k, [64, 32, 32]))]
    for r, col in enumerate(cols):  # rank r holds the r-th half of q, of k and of v, in that order
        want = torch.cat([y[:, lo + r * n:lo + (r + 1) * n] for lo, n in [(0, 32), (64, 16), (96, 16)]], dim=1)
        torch.testing.assert_close(col(x), want)
    k, x = 1024, torch.randn(3, 1024)  # four ranks of 256 columns: one q4_K block a row each
    w = quant.random_stored(wtype, 48, k, 4)
    rows = [loaded(r, w, wtype) for r in ranks(4, lambda: RowParallelLinear(k, 48))]
    assert all(r.weight.dtype == w.dtype and r.in_features == k // 4 for r in rows)
    partial = sum(Linear.forward(r, x[:, i * 256:(i + 1) * 256]) for i, r in enumerate(rows))  # the all-reduce
    torch.testing.assert_close(partial, loaded(Linear(k, 48), w, wtype)(x), rtol=1e-4, atol=1e-4)
    unreduced = ranks(4, lambda: RowParallelLinear(k, 48, reduce_results=False))[2]  # its caller sums (MoE)
    torch.testing.assert_close(loaded(unreduced, w, wtype)(x[:, 512:768]), Linear.forward(rows[2], x[:, 512:768]))


def test_row_split_must_fall_on_block_boundaries():
    w = quant.random_stored(quant.Q4_K, 8, 256, 0)
    with pytest.raises(ValueError, match="do not split 2 ways at block boundaries"):
        loaded(ranks(2, lambda: RowParallelLinear(256, 8))[1], w, quant.Q4_K)


def test_biases_column_sliced_row_on_rank_zero_only():
    w, b, x = torch.randn(6, 8), torch.randn(6), torch.randn(2, 8)
    cols = [loaded(c, w, bias=b) for c in ranks(2, lambda: ColumnParallelLinear(8, 6, bias=True))]
    torch.testing.assert_close(torch.cat([c.bias for c in cols]), b)
    rows = [loaded(r, w, bias=b) for r in ranks(2, lambda: RowParallelLinear(8, 6, bias=True))]
    assert rows[0].bias is not None and rows[1].bias is None  # counted once in the all-reduce
    total = Linear.forward(rows[0], x[:, :4]) + Linear.forward(rows[1], x[:, 4:])
    torch.testing.assert_close(total, x @ w.T + b)


def test_vocab_shards_pad_and_cover_every_id():
    """10 rows over 3 ranks: shards of 4, the last padded with zeros; lookups and logits assemble."""
    table, ids, h = torch.randn(10, 8), torch.tensor([0, 3, 4, 9, 7]), torch.randn(2, 8)
    embs = [loaded(e, table) for e in ranks(3, lambda: VocabParallelEmbedding(10, 8))]
    assert [e.num_local for e in embs] == [4, 4, 2] and embs[2].weight.shape == (4, 8)
    assert not embs[2].weight[2:].any()

    def lookup(e):  # VocabParallelEmbedding.forward without its all-reduce
        local = ids - e.start
        inside = (local >= 0) & (local < e.num_local)
        return Embedding.forward(e, torch.where(inside, local, 0)).masked_fill(~inside[:, None], 0)

    torch.testing.assert_close(sum(lookup(e) for e in embs), table[ids])
    heads = [loaded(head, table) for head in ranks(3, lambda: ParallelLMHead(8, 10))]
    logits = torch.cat([Linear.forward(head, h) for head in heads], dim=-1)
    torch.testing.assert_close(logits[:, :10], h @ table.T)
    assert not logits[:, 10:].any()


@pytest.mark.parametrize("heads, kv_heads, inter, what", [(9, 3, 64, "9 attention heads"), (4, 1, 64, "1 KV heads"),
                                                           (4, 2, 33, "33 intermediate size")])
def test_a_size_that_does_not_divide_is_one_clear_error(heads, kv_heads, inter, what):
    args = ModelArgs(arch="llama", hidden_size=32, num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=8,
                     intermediate_size=inter, vocab_size=16, max_position=32)
    with pytest.raises(ValueError, match=f"tensor_parallel_size 2 does not divide the model's {what}"):
        ranks(2, lambda: LlamaForCausalLM(args))


def test_mla_is_refused_under_tensor_parallelism():
    """MLA's pool holds one latent "head" a token: nothing to split by heads, so DeepSeek says so at build."""
    from inferlab.model.deepseek import DeepseekForCausalLM
    args = ModelArgs(arch="deepseek_v2", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=8,
                     intermediate_size=64, vocab_size=16, max_position=32)
    with pytest.raises(ValueError, match="tensor parallelism does not split MLA's latent KV cache"):
        ranks(2, lambda: DeepseekForCausalLM(args))


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1"),
    ({"tensor_parallel_size": 2, "nnodes": 3}, "nnodes must divide tensor_parallel_size 2"),
    ({"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 2}, r"node_rank must be in \[0, nnodes 2\)"),
    ({"tensor_parallel_size": 2, "master_port": 70000}, "master_port must be in"),
    ({"tensor_parallel_size": 2, "preemption_mode": "swap"}, "preemption_mode 'swap' needs tensor_parallel_size 1"),
])
def test_bad_parallel_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


# --- real ranks ----------------------------------------------------------------------------------

@pytest.fixture
def no_orphans():
    """Every process a test starts is gone when it ends (any left over is killed, then reported)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while (left := [p for p in me.children(recursive=True) if p.pid not in before and p.status() != "zombie"]) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, f"processes left running: {[' '.join(p.cmdline()[-6:]) for p in left]}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tok = train_tokenizer()
    return {name: build_checkpoint(name, str(tmp_path_factory.mktemp(name)), tok)
            for name in ("qwen2", "qwen3", "llama_tied")}


@pytest.fixture
def make_llm(no_orphans):
    """LLMs whose workers are shut down at teardown, whatever the test did."""
    made = []

    def make(**kwargs) -> LLM:
        kwargs.setdefault("dtype", "float32")
        llm = LLM(**kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.shutdown()


def shared_prefix_prompts(ckpt) -> list[list[int]]:
    """Prompts of 11 to 27 tokens, three of them sharing a 16-token prefix (4 blocks of 4)."""
    a, b, c = ckpt.prompts
    base = (c + b)[:16]
    return [base + a, base + b[:5], base + c[-6:], c + a, b + a + a]


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_two_ranks_generate_what_one_does(checkpoints, make_llm, name):
    """Batched, prefix cached, chunked (6-token pieces) and preempted (a pool of 24 blocks of 4 for
    five prompts of 12 + 11 to 27 tokens), twice: token for token the single process's output."""
    ckpt, prompts = checkpoints[name], [{"prompt_token_ids": p} for p in shared_prefix_prompts(checkpoints[name])]
    config = dict(model=ckpt.path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16,
                  long_prefill_token_threshold=6)
    one, two = make_llm(**config), make_llm(**config, tensor_parallel_size=2)
    for _ in range(2):  # the second round reads its prompts from the prefix cache
        want = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY, use_tqdm=False)]
        assert got == want
    scored = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)  # every rank keeps the scored rows
    for a, b in zip(one.generate(prompts, scored, use_tqdm=False), two.generate(prompts, scored, use_tqdm=False)):
        assert len(b.prompt_logprobs) == len(a.prompt_logprobs) and b.outputs[0].token_ids == a.outputs[0].token_ids
        assert all(abs(float(x[t]) - float(y[t])) < 1e-4 for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])
                   for t in x)
    for a, b in zip(one.embed(prompts, use_tqdm=False), two.embed(prompts, use_tqdm=False)):  # rank 0 pools
        assert max(abs(x - y) for x, y in zip(a.outputs.embedding, b.outputs.embedding)) < 1e-4
    alone = make_llm(model=ckpt.path, pooling_type="MEAN")  # no chunks, no preemption
    want = [o.outputs.embedding for o in alone.embed(prompts, use_tqdm=False)]
    for llm in (one, two):  # every rank keeps the mean-pooled rows
        llm.engine.pooling_type = "MEAN"
        for w, got in zip(want, llm.embed(prompts, use_tqdm=False)):
            assert max(abs(x - y) for x, y in zip(w, got.outputs.embedding)) < 1e-4
    engine = two.engine
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0
    stats = engine.runner.comm_stats()
    # two all-reduces a layer (2 layers) and one for the embedding, every step
    assert stats["all_reduces"] == 5 * stats["steps"] and stats["all_reduce_s"] > 0


def test_moe_two_ranks_generate_what_one_does(tmp_path, make_llm):
    """Qwen2-MoE (a dense layer, a gated shared expert): attention and the dense MLP are split, the
    router and experts run whole on every rank (same input, same choice), and the output is one rank's."""
    ckpt = build_moe("qwen2_moe", str(tmp_path), train_tokenizer())
    prompts = [{"prompt_token_ids": p} for p in ckpt.prompts]
    config = dict(model=ckpt.path, block_size=4, num_kv_blocks=32, max_num_batched_tokens=8)
    one, two = make_llm(**config), make_llm(**config, tensor_parallel_size=2)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, GREEDY, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in two.generate(prompts, GREEDY, use_tqdm=False)] == want
    two.engine.check_integrity()


def chat(tok, question: str) -> dict:
    text = tok.apply_chat_template([{"role": "user", "content": question}])
    return {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}


def test_embedded_model_three_ranks_and_two_refused(smol, make_llm):
    """9 heads and 3 KV heads: 3 ranks split them (and the Q4_1 rows at block boundaries) with
    the single process's greedy output; 2 ranks is a one-line error that leaves nothing running."""
    prompts = [chat(smol[1], q) for q in ("What is the capital of France?", "hi")]
    params = SamplingParams(temperature=0, max_tokens=6)
    want = [o.outputs[0].token_ids for o in LLM(loaded=smol, num_kv_blocks=64).generate(prompts, params,
                                                                                         use_tqdm=False)]
    three = make_llm(num_kv_blocks=64, tensor_parallel_size=3)
    assert [o.outputs[0].token_ids for o in three.generate(prompts, params, use_tqdm=False)] == want
    down = three.engine.model.model.layers[0].mlp.down_proj
    # kept as stored (on AVX-512 regrouped, x16: the same blocks), 16 blocks of 32 a row
    assert (down.wtype.base or down.wtype, down.in_features) == (quant.Q4_1, 1536 // 3)
    three.engine.shutdown()
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the model's 9 attention heads"):
        make_llm(num_kv_blocks=64, tensor_parallel_size=2)


def test_ctrl_c_waits_for_the_step_and_a_killed_worker_is_named(checkpoints, make_llm):
    """A Ctrl-C lands in the middle of some step: the driver finishes that step before raising, so
    the ranks stay in step and the engine goes on. A worker killed mid-run fails the next step
    within seconds, naming the rank; the engine stays failed."""
    ckpt = checkpoints["qwen2"]
    llm = make_llm(model=ckpt.path, block_size=4, num_kv_blocks=64, tensor_parallel_size=2)
    engine, prompts = llm.engine, [{"prompt_token_ids": p} for p in ckpt.prompts]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    execute, steps = engine.runner.execute, []

    def interrupted_step(scheduled):  # the third step is interrupted while it runs, however fast steps are
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return execute(scheduled)

    engine.runner.execute = interrupted_step
    gc.collect()  # a KeyboardInterrupt raised inside a finalizer would be swallowed: none run meanwhile
    gc.disable()
    # Python's own handler, installed again at the OS level (a library loaded by an earlier test may
    # have put its own there, which Python's signal.getsignal would not show)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
    finally:
        gc.enable()
        signal.signal(signal.SIGINT, previous)
        engine.runner.execute = execute
    assert len(steps) == 3  # the interrupt ended the generation after the step it landed in
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want

    for i, p in enumerate(ckpt.prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=80, ignore_eos=True))
    engine.step()
    worker = engine.runner.procs[1]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=rf"rank 1 \(pid {worker.pid}\) was killed by SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError, match="rank 1"):  # and stays so, at once
        engine.step()


def test_an_idle_engine_notices_a_killed_worker(checkpoints, make_llm):
    """With no request running, no step shows the failure: the serving loop looks in on its own,
    so /health answers 503 naming the rank and the server is told to stop."""
    llm = make_llm(model=checkpoints["qwen2"].path, block_size=4, num_kv_blocks=64, tensor_parallel_size=2)
    engine, told_to_stop = AsyncEngine(llm.engine), threading.Event()
    engine.on_dead = told_to_stop.set
    try:
        http = TestClient(build_app(engine, "tiny"))
        assert http.get("/health").json() == {"status": "ok"}
        worker = llm.engine.runner.procs[1]
        os.kill(worker.pid, signal.SIGKILL)
        assert told_to_stop.wait(10)
        r = http.get("/health")
        assert r.status_code == 503 and f"rank 1 (pid {worker.pid}) was killed by SIGKILL" in r.json()["error"]
    finally:
        engine.shutdown()


RANK_ONE = """
import sys, time, torch, torch.distributed as dist
from inferlab.distributed import TensorParallelGroup
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False)
group = TensorParallelGroup(1, 2)
group.connect(store, torch.device("cpu"))
time.sleep(2.5)  # a slow rank: the driver's all-reduce waits through its watch
group.all_reduce(torch.full((4,), 2.0))
work = group.cpu_pg.broadcast([torch.empty(16 << 20)], dist.BroadcastOptions())  # its receive, posted
store.set("posted", "1")
time.sleep(120)
"""


def test_the_watch_waits_out_a_slow_rank_and_ends_a_wait_on_a_dead_one(monkeypatch, no_orphans):
    """A collective that waits on a slow rank runs the group's watch every second and still ends
    with the sum. Gloo never fails a send still in flight when its peer dies: the driver's wait would
    run out its whole timeout, and dropping the group would wait as long (its destructor joins the
    stuck thread). The watch gives up on the wait within a second, and close() returns at once.
    (The worker is stopped first, so the 64 MB send is surely still being written when it dies.)"""
    monkeypatch.setattr("inferlab.distributed.group.STEP_TIMEOUT", timedelta(seconds=30))
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    worker = subprocess.Popen([sys.executable, "-c", RANK_ONE, str(store.port)], cwd=ROOT)
    try:
        group = TensorParallelGroup(0, 2)
        group.connect(store, torch.device("cpu"))
        looks: list[float] = []

        def watch() -> None:
            looks.append(time.monotonic())
            if worker.poll() is not None:
                raise EngineDeadError("rank 1 died")
        group.watch = watch
        assert group.all_reduce(torch.full((4,), 1.0)).tolist() == [3.0] * 4 and looks and not group.abandoned
        store.wait(["posted"])
        os.kill(worker.pid, signal.SIGSTOP)
        killer = threading.Timer(0.5, worker.kill)
        killer.start()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1 died"):
            group.broadcast(torch.ones(16 << 20))
        assert time.monotonic() - start < 5 and group.abandoned
        start = time.monotonic()
        group.close()
        assert time.monotonic() - start < 1
    finally:
        worker.kill()
        worker.wait()


def inferlab(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inferlab.cli", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_nodes_on_loopback(checkpoints, no_orphans):
    """Two separately started commands, as on two hosts: node 1 runs rank 1 for node 0's engine
    (tied embeddings, vocabulary-parallel). Node 0 is started with torchrun-style flags, node 1 the
    way a launcher starts a rank: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
    ckpt, port = checkpoints["llama_tied"], str(_free_port())
    prompt, params = "The quick brown fox", SamplingParams(temperature=0, max_tokens=12)
    want = LLM(model=ckpt.path, dtype="float32", num_kv_blocks=64).generate(prompt, params, use_tqdm=False)
    args = ["generate", "--raw", prompt, "--model", ckpt.path, "--dtype", "float32", "--max-tokens", "12",
            "--num-kv-blocks", "64", "--tensor-parallel-size", "2"]
    node1 = inferlab(*args, env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    node0 = inferlab(*args, "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", port)
    try:
        (_, err1), (text, err0) = node1.communicate(timeout=180), node0.communicate(timeout=180)
    finally:
        node0.kill()
        node1.kill()
    assert node0.returncode == 0, err0
    assert node1.returncode == 0, err1
    assert text == want[0].outputs[0].text + "\n"
    assert f"ranks [1] of 2: joining the driver at 127.0.0.1:{port}" in err1


def rank_one_node(ckpt, port: str, *, grace: float | None = None) -> subprocess.Popen:
    """Another host's command for rank 1 of two, as a launcher starts it; `grace`: its BEAT_GRACE."""
    patch = f"import inferlab.distributed.launch as launch; launch.BEAT_GRACE = {grace}; " if grace else ""
    code = patch + "import sys; from inferlab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "generate", "--raw", "x", "--model", ckpt.path,
                             "--tensor-parallel-size", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                            "MASTER_PORT": port})


@pytest.mark.parametrize("how", ["stopped-mid-step", "stopped-idle", "killed-mid-step"])
def test_a_lost_rank_on_another_host_is_named(checkpoints, make_llm, monkeypatch, how):
    """A rank on another host can go with no connection closing (its machine lost, its process
    stopped): gloo would wait out the step's 10 minutes, and an idle engine would never know. Its
    heartbeats stop, and the driver names it after BEAT_GRACE (here 3 s), in a step or idle. A
    killed one is named too, where gloo's error gives only its address."""
    monkeypatch.setattr("inferlab.distributed.launch.BEAT_GRACE", 3.0)
    ckpt, port = checkpoints["qwen2"], str(_free_port())
    node1 = rank_one_node(ckpt, port)
    try:
        llm = make_llm(model=ckpt.path, block_size=4, num_kv_blocks=64, tensor_parallel_size=2, nnodes=2,
                       master_addr="127.0.0.1", master_port=int(port))
        engine = llm.engine
        for i, p in enumerate(ckpt.prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=200, ignore_eos=True))
        if how != "stopped-idle":
            engine.step()
        os.kill(node1.pid, signal.SIGKILL if how == "killed-mid-step" else signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank 1 has sent no heartbeat for \d+\.\d s"):
            while True:
                if how == "stopped-idle":
                    engine.runner.check_health()
                    time.sleep(0.2)
                else:
                    engine.step()
        assert time.monotonic() - start < (6 if how == "killed-mid-step" else 9)
    finally:
        node1.kill()
        node1.communicate()


def test_a_rank_on_another_host_ends_when_its_driver_goes_silent(checkpoints, no_orphans):
    """The other way round: the driver's host lost (here: its process stopped). The remote rank,
    idle in a collective that would wait a year, ends on its own once the driver's store has not
    answered its heartbeats for BEAT_GRACE (3 s in that process)."""
    ckpt, port, http = checkpoints["qwen2"], str(_free_port()), _free_port()
    node1 = rank_one_node(ckpt, port, grace=3)
    driver = inferlab("serve", "--model", ckpt.path, "--dtype", "float32", "--port", str(http), "--num-kv-blocks",
                      "64", "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
                      "--master-port", port)
    try:
        wait_for_server(driver, f"http://127.0.0.1:{http}")
        os.kill(driver.pid, signal.SIGSTOP)
        start = time.monotonic()
        _, err = node1.communicate(timeout=30)
        assert time.monotonic() - start < 10
        assert node1.returncode == 0 and "the driver stopped (its store stopped answering)" in err, err
    finally:
        for p in (node1, driver):
            p.kill()
            p.communicate()


def wait_for_server(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited: {proc.stderr.read()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


@pytest.mark.parametrize("ending", ["sigterm", "killed-worker", "killed-idle-worker"])
def test_server_with_two_ranks(checkpoints, no_orphans, ending):
    """The official openai client gets the single process's greedy answers; under load, SIGTERM
    stops the server and its worker in order, and a killed worker fails the streaming request with
    an error naming the rank and takes the server down (exit 1) on its own, as it does when it
    dies while the server is idle."""
    ckpt, port = checkpoints["qwen3"], _free_port()
    proc = inferlab("serve", "--model", ckpt.path, "--dtype", "float32", "--port", str(port), "--block-size", "4",
                    "--num-kv-blocks", "512", "--tensor-parallel-size", "2", "--served-model-name", "tiny")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        if ending == "sigterm":
            offline = LLM(model=ckpt.path, dtype="float32", num_kv_blocks=64, block_size=4)
            for p in ckpt.prompts:
                r = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
                ref = offline.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=10),
                                       use_tqdm=False)[0].outputs[0]
                assert (r.choices[0].text, r.choices[0].finish_reason) == (ref.text, ref.finish_reason)
            answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox"}],
                                                    max_tokens=5, temperature=0)
            assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1
        started, outcome = threading.Event(), {}

        def stream() -> None:  # under load when the signal or the failure comes
            try:  # (the kill comes from here, at the first token, so it surely lands mid-stream)
                for _ in client.completions.create(model="tiny", prompt=ckpt.prompts[0], max_tokens=100,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    if not started.is_set() and ending == "killed-worker":
                        workers[0].kill()
                    started.set()
            except openai.OpenAIError as e:
                outcome["error"] = e

        load = threading.Thread(target=stream, daemon=True)
        t0 = time.monotonic()
        if ending == "killed-idle-worker":
            workers[0].kill()
        else:
            load.start()
            assert started.wait(60)
            t0 = time.monotonic()
            if ending == "sigterm":
                proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - t0 < 20
        if load.ident is not None:
            load.join(timeout=10)
            assert not load.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stderr.read()
    assert "Traceback" not in output, output
    if ending == "sigterm":
        assert proc.returncode in (0, -signal.SIGTERM), output
    else:
        reason = f"tensor-parallel rank 1 (pid {workers[0].pid}) was killed by SIGKILL"
        assert proc.returncode == 1 and f"error: {reason}" in output, output
        if ending == "killed-worker":
            assert reason in str(outcome.get("error")), outcome
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_a_terminated_driver_leaves_no_worker(checkpoints, no_orphans, tmp_path):
    """SIGTERM ends `inferlab bench` at once (Python's default), with no chance to clean up: its
    worker ends by itself, on the kernel's parent-death signal. (Ctrl-C and the server's SIGTERM
    stop the workers in order: tested above.)"""
    workload = tmp_path / "long.json"  # one request at a time: thousands of steps
    workload.write_text(json.dumps({"requests": [{"prompt_token_ids": [5, 6, 7], "max_tokens": 100}] * 100}))
    proc = inferlab("bench", "--workload", str(workload), "--model", checkpoints["qwen2"].path, "--dtype", "float32",
                    "--num-kv-blocks", "64", "--max-num-seqs", "1", "--tensor-parallel-size", "2")
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "Processed prompts" not in "".join(err):  # the timed run has begun
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)
            time.sleep(0.1)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 1
        proc.terminate()
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGTERM, "".join(err)
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_the_default_pool_is_shared_by_a_hosts_ranks(smol):
    """By default a host's ranks split its pool's bytes, so the pool holds as many tokens as one
    rank's; ranks on hosts of their own each take a host's default; a size given is each rank's."""
    args, cpu = smol[0].args, torch.device("cpu")

    def blocks(**kwargs) -> int:
        return kv_pool.kv_pool_blocks(EngineConfig(**kwargs), args, torch.bfloat16, cpu)[0]

    one = blocks()
    assert one > 0 and abs(blocks(tensor_parallel_size=3) - one) <= 3
    assert abs(blocks(tensor_parallel_size=3, nnodes=3) - 3 * one) <= 3
    assert abs(blocks(tensor_parallel_size=3, kv_cache_memory="1GiB") - 3 * blocks(kv_cache_memory="1GiB")) <= 3


@pytest.mark.parametrize("env, message", [
    ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000': an integer from 0 to 65535"),  # a TypeError from the store
    ({"MASTER_PORT": "bogus"}, "MASTER_PORT='bogus': an integer from 0 to 65535"),  # "invalid literal for int()"
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x': an integer from 0 to 1"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='2': an integer from 0 to 1"),
    ({"RANK": "1", "WORLD_SIZE": "two", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "WORLD_SIZE='two': an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "-1"}, "MASTER_PORT='-1': an integer from 1"),
])
def test_a_launchers_bad_environment_is_named(monkeypatch, env, message):
    from inferlab.distributed.launch import Rendezvous
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        Rendezvous.of(EngineConfig(tensor_parallel_size=2))
