"""What the engine logs: the two start-up lines that say what it runs, its KV pool, then its weights,
activations, kernels and decode path (what `make run` prints, and what a bug report should quote);
and a step observer that fails."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from inferlab import kernels
from inferlab.kv_pool import container_memory
from inferlab.model.layers import quant
from inferlab.model.layers.linear import Linear
from inferlab.model.layers.quant import describe_weights

if TYPE_CHECKING:
    from inferlab.engine import LLMEngine

log = logging.getLogger("inferlab")


def log_start(engine: LLMEngine, num_blocks: int, per_block: int) -> None:
    """Log the engine's pool (`num_blocks` of `per_block` bytes) and what computes each step."""
    config, dtype = engine.config, str(engine.dtype).removeprefix("torch.")
    cpu = engine.device.type == "cpu"
    limit = container_memory() if cpu and config.num_kv_blocks is None and not config.kv_cache_memory else None
    log.info("KV cache: %d blocks x %d tokens = %d token slots, %.1f MiB (%s on %s%s%s)", num_blocks,
             config.block_size, num_blocks * config.block_size, num_blocks * per_block / 2**20, dtype, engine.device,
             ", pages touched at start" if config.kv_cache_prefault and cpu else "",
             f"; sized from a container's {limit / 2**30:.1f} GiB memory limit" if limit else "")
    if engine.max_request_tokens < engine.max_model_len:  # vLLM refuses to start; here a request is capped
        log.warning("the KV pool holds %d tokens, fewer than max_model_len %d: a request (prompt and output) "
                    "gets at most that many, and a server reports it as the context (raise "
                    "--kv-cache-memory or --num-kv-blocks for more)", engine.max_request_tokens, engine.max_model_len)
    native, runner = engine.runner.native, engine.runner
    int8 = "" if not config.int8_activations else (
        " (int8 into integer-block layers)" if any(getattr(m, "int8_active", False) for m in engine.model.modules())
        else " (int8 asked for, but no layer keeps an integer block type)")
    if config.quantization in quant.BY_NAME:  # an explicit mode: say which layers its blocks cannot take
        block = quant.BY_NAME[config.quantization].block
        left = [m for m in engine.model.modules() if isinstance(m, Linear) and m.in_features % block]
        if left:
            log.warning("--quantization %s: %d linear layers stay %s, their rows of %s inputs not a multiple of "
                        "its %d-weight blocks", config.quantization, len(left), dtype,
                        sorted({m.in_features for m in left}), block)
    # the ops' kernels (linears, norms, RoPE...) run wherever they take the tensors; attention's may not
    ops = kernels.native() if engine.device.type == "cpu" and engine.dtype in kernels.DTYPE_CODES else None
    weights, used = describe_weights(engine.model), f"native {ops.isa}" if ops else "PyTorch"
    if ops and "x16" in weights:  # which of the regrouped kernel's products run (fp32 inputs: FMAs)
        used += f" (x16 blocks by {'fp32' if engine.dtype == torch.float32 else ops.products()} products)"
    if ops and native is None:
        used += ", attention by PyTorch"
    log.info("weights: %s; activations: %s%s; kernels: %s; decode steps: %s", weights, dtype, int8, used,
             f"one native call ({len(runner.tape.ops)} ops)" if runner.tape else "op by op")


def notify(observers: list, outputs: list) -> None:
    """Hand a step's outputs to each observer (a recorder, a dashboard feed). One that fails is logged:
    a watcher's fault must not lose the step's outputs, which their requests have already given up."""
    for observe in observers:
        try:
            observe(outputs)
        except Exception:
            log.exception("a step observer (%r) failed; the step's outputs are returned all the same", observe)
