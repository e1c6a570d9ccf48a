"""KVTransferConfig: vLLM's `--kv-transfer-config` JSON, parsed and validated with one-line errors.

    {"kv_connector": "RedisConnector", "kv_role": "kv_both",
     "kv_connector_extra_config": {"url": "redis://127.0.0.1:6379"}}

`kv_role` says which way blocks flow: a `kv_producer` saves the blocks it computes to the store
(a prefill instance), a `kv_consumer` loads blocks from it instead of computing them (a decode
instance), `kv_both` does both (instances sharing one KV pool).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.json_config import json_object

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_CONNECTORS = ("SharedStorageConnector", "RedisConnector")
# each connector's kv_connector_extra_config: the key it needs first, then those it may take
EXTRA_KEYS = {"SharedStorageConnector": ("shared_storage_path", "load_timeout"),
              "RedisConnector": ("url", "timeout", "load_timeout")}


@dataclass
class KVTransferConfig:
    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_connector not in KV_CONNECTORS:
            raise ValueError(f"kv_connector must be one of {KV_CONNECTORS}, got {self.kv_connector!r}")
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {KV_ROLES}, got {self.kv_role!r}")
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ValueError("kv_connector_extra_config must be a JSON object")
        keys = EXTRA_KEYS[self.kv_connector]
        if not isinstance(self.kv_connector_extra_config.get(keys[0]), str):
            raise ValueError(f"{self.kv_connector} needs kv_connector_extra_config.{keys[0]} (a string)")
        unknown = set(self.kv_connector_extra_config) - set(keys)  # a misspelt timeout would be dropped
        if unknown:
            raise ValueError(f"kv_connector_extra_config has keys {self.kv_connector} does not take: "
                             f"{sorted(unknown)} (it takes {list(keys)})")

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @classmethod
    def parse(cls, value: KVTransferConfig | dict | str) -> KVTransferConfig:
        """From a config object, a dict, or the JSON text the command line takes."""
        if isinstance(value, KVTransferConfig):
            return value
        value = json_object(value, "kv_transfer_config")
        unknown = set(value) - {"kv_connector", "kv_role", "kv_connector_extra_config"}
        if unknown:
            raise ValueError(f"kv_transfer_config has unknown fields: {sorted(unknown)}")
        if "kv_connector" not in value:
            raise ValueError(f"kv_transfer_config needs kv_connector, one of {KV_CONNECTORS}")
        return cls(**value)
