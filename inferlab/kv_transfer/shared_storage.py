"""SharedStorageConnector (vLLM's name): instances on one host share KV blocks as files in
`kv_connector_extra_config.shared_storage_path`, one file per block, named by its key.

A block is written to a temporary file and renamed into place, so a reader never sees half a
block. Nothing is ever evicted: the folder grows with every distinct block saved (delete it, or
files in it, whenever no instance is loading: a missing file is a miss).
"""
from __future__ import annotations

import os
import tempfile

from inferlab.kv_transfer.store import BlockStore, StoreConnector


class FileStore(BlockStore):
    def __init__(self, root: str) -> None:
        self.root = root

    def check(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise ValueError(f"shared_storage_path {self.root!r} is not a writable folder: {e.strerror}") from None

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) + ".kv"

    def contains(self, keys: list[str]) -> list[bool]:
        return [os.path.exists(self._path(k)) for k in keys]

    def get(self, keys: list[str]) -> list[bytes | None]:
        values: list[bytes | None] = []
        for key in keys:
            try:
                with open(self._path(key), "rb") as f:
                    values.append(f.read())
            except FileNotFoundError:
                values.append(None)
        return values

    def put(self, key: str, value: bytes) -> None:
        path = self._path(key)
        if os.path.exists(path):  # a block's bytes are fixed by its key: written once
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


class SharedStorageConnector(StoreConnector):
    def __init__(self, config, runner, block_manager, namespace: str) -> None:
        path = config.kv_connector_extra_config["shared_storage_path"]
        super().__init__(config, FileStore(path), runner, block_manager, namespace)
