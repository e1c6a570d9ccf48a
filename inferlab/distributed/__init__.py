"""Tensor parallelism on torch.distributed: one model split across processes, on one host or many.

Every layer and the KV pool are split across `tensor_parallel_size` ranks (by heads, features and
vocabulary rows: `layers.py`); the engine (scheduler, block manager, sampling) stays in the driver,
which is rank 0 and holds a shard itself. Each step the driver broadcasts the scheduled batch once
(`step.py`); every rank runs its shard, two all-reduces per decoder layer, and the logits are
gathered to the driver. Gloo on CPU, NCCL on GPU (`group.py`).

| module | its one job |
|---|---|
| `group.py` | a rank's handle on the group: collectives, their timing, the construction context |
| `layers.py` | column-, row- and vocabulary-parallel layers built on `model.layers.linear` |
| `step.py` | the per-step message: a `StepBatch` as two host tensors |
| `launch.py` | rendezvous (flags or `MASTER_ADDR`...), the start-up handshake, this host's worker processes |
| `executor.py` | the driver: starts the ranks, loads shard 0, runs each step; what the engine calls |
| `worker.py` | a worker rank's process: load its shard, run the steps it is sent |
"""
from inferlab.distributed.group import EngineDeadError, TensorParallelGroup, building, current_group

__all__ = ["EngineDeadError", "TensorParallelGroup", "building", "current_group"]
