"""A store in memory: for tests and for `check`-style one-shot commands."""

from __future__ import annotations

from ..credential import Token
from ..crypto import Codec


class MemoryStore:
    def __init__(self, codec: Codec | None = None, *, shared: bool = False) -> None:
        self._codec = codec or Codec()
        self._tokens: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}
        self._shared = shared
        self.saves = 0

    @property
    def shared(self) -> bool:
        return self._shared

    async def load(self, key: str) -> Token | None:
        sealed = self._tokens.get(key)
        return None if sealed is None else Token.from_json(self._codec.open(sealed, key.encode()))

    async def save(self, key: str, token: Token) -> None:
        self._tokens[key] = self._codec.seal(token.to_json(), key.encode())
        self.saves += 1

    async def delete(self, key: str) -> None:
        self._tokens.pop(key, None)

    async def get_blob(self, key: str) -> bytes | None:
        return self._blobs.get(key)

    async def put_blob(self, key: str, value: bytes) -> None:
        self._blobs[key] = value

    async def close(self) -> None:
        pass
