"""Where an engine's model comes from: one already loaded and shared (tests, experiments), one loaded
here from `config.model`, or with tensor parallelism a shard in each rank's process."""
from __future__ import annotations

import torch

from inferlab.config import EngineConfig
from inferlab.distributed.executor import TensorParallelExecutor
from inferlab.model.base import CausalLM
from inferlab.model.loader import load_model
from inferlab.model.tokenizer import Tokenizer


def engine_model(config: EngineConfig, loaded: tuple[CausalLM, Tokenizer] | None
                 ) -> tuple[CausalLM, Tokenizer, torch.device, TensorParallelExecutor | None]:
    """(model, tokenizer, device, the ranks' executor or None). The caller shuts the executor down
    if the engine fails to start after it."""
    tp = config.tensor_parallel_size
    if loaded is not None:
        if tp > 1:
            raise ValueError("tensor_parallel_size > 1 loads each rank's shard: it cannot share a loaded model")
        return *loaded, loaded[0].device, None
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tp > 1:  # starts the other ranks, which load their shards while this process loads shard 0
        executor = TensorParallelExecutor(config, device)
        return executor.model, executor.tokenizer, device, executor
    model, tokenizer = load_model(config.model, config.dtype, device, config.quantization, config.int8_activations,
                                  config.hf_overrides)
    return model, tokenizer, device, None
