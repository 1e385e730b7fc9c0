"""Token stores behind one protocol (:class:`broker.types.TokenStore`)."""

from __future__ import annotations

from ..config import StoreConfig
from ..crypto import Codec
from ..metrics import Metrics
from ..types import TokenStore
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = ["MemoryStore", "SqliteStore", "open_store"]


async def open_store(config: StoreConfig, metrics: Metrics | None = None) -> TokenStore:
    """Open the configured store; raise StoreError/EncryptionKeyError with a clear message."""
    codec = Codec(config.encryption_key, config.previous_encryption_keys)
    if config.redis:
        from .redis import RedisStore

        return await RedisStore.open(config, codec, metrics)
    return await SqliteStore.open(config.sqlite_path, codec, timeout=config.timeout)
