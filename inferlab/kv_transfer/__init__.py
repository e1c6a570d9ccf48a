"""KV transfer: connectors that move KV blocks between an engine's pool and a store shared by
instances (vLLM v1's KV-connector interface, `base.py`), configured by `KVTransferConfig`; the
scheduler's side of a load, the requests waiting for their blocks, is `loads.py`."""
from __future__ import annotations

from inferlab.kv_transfer.base import Finished, KVConnectorBase, KVConnectorMetadata
from inferlab.kv_transfer.config import KVTransferConfig

__all__ = ["Finished", "KVConnectorBase", "KVConnectorMetadata", "KVTransferConfig", "make_connector",
           "store_namespace"]


def make_connector(config: KVTransferConfig, runner, block_manager, namespace: str) -> KVConnectorBase:
    """The connector `config.kv_connector` names, its store checked (a one-line ValueError if unusable)."""
    if config.kv_connector == "RedisConnector":
        from inferlab.kv_transfer.redis import RedisConnector
        return RedisConnector(config, runner, block_manager, namespace)
    from inferlab.kv_transfer.shared_storage import SharedStorageConnector
    return SharedStorageConnector(config, runner, block_manager, namespace)


def store_namespace(config, model: str, args) -> str:
    """The name an engine's blocks go under in a shared store: `model` (name and dtype), the weights
    as run (re-quantized, int8 activations) and the block shape, so that other models' blocks never
    mix in, nor KV that other arithmetic computed. `config`: the EngineConfig; `args`: ModelArgs."""
    weights = (config.quantization if config.quantization.startswith("q") else "stored") + \
        ("+int8" if config.int8_activations else "")
    return f"{model}:{weights}:{args.num_layers}x{args.num_kv_heads}x{args.head_dim}x{config.block_size}"
