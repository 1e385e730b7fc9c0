"""SQLite store and encryption at rest."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from broker.credential import Token
from broker.crypto import Codec
from broker.errors import ConfigError, EncryptionKeyError, StoreError
from broker.secrets import Secret
from broker.stores import SqliteStore

KEY = Secret(base64.b64encode(b"k" * 32).decode())
OTHER = Secret(base64.b64encode(b"o" * 32).decode())


def token(access: str = "access-token-value", refresh: str | None = "refresh-token-value") -> Token:
    return Token(access=access, refresh=refresh, obtained_at=1.0, expires_at=2.0, grant="password")


class TestSqliteStore:
    async def test_round_trip_and_file_mode(self, tmp_path: Path) -> None:
        """A saved token loads back; the file is created 0600 in a 0700 directory."""
        path = tmp_path / "new-dir" / "tokens.db"
        store = await SqliteStore.open(str(path), Codec())
        try:
            await store.save("ifs:abc", token())
            loaded = await store.load("ifs:abc")
            assert loaded == token()
            assert await store.load("other") is None
        finally:
            await store.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700

    async def test_survives_reopen(self, tmp_path: Path) -> None:
        """What was saved is there after the store is opened again."""
        path = str(tmp_path / "t.db")
        store = await SqliteStore.open(path, Codec())
        await store.save("k", token(refresh="rotated-newest"))
        await store.close()
        store = await SqliteStore.open(path, Codec())
        try:
            loaded = await store.load("k")
            assert loaded is not None and loaded.refresh == "rotated-newest"
        finally:
            await store.close()

    async def test_unopenable_path_is_a_store_error(self, tmp_path: Path) -> None:
        """A path under a regular file cannot be opened: a clear StoreError."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(StoreError, match="cannot open the token store"):
            await SqliteStore.open(str(blocker / "tokens.db"), Codec())


class TestEncryption:
    async def test_no_token_in_clear_with_a_key(self, tmp_path: Path) -> None:
        """With encryption_key set, the file holds no token bytes in clear."""
        path = tmp_path / "t.db"
        store = await SqliteStore.open(str(path), Codec(KEY))
        await store.save("k", token())
        assert (await store.load("k")) == token()
        await store.close()
        raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
        assert b"access-token-value" not in raw and b"refresh-token-value" not in raw

    async def test_wrong_key_is_a_clear_error(self, tmp_path: Path) -> None:
        """Opening with another key fails naming encryption_key, never garbage."""
        path = str(tmp_path / "t.db")
        store = await SqliteStore.open(path, Codec(KEY))
        await store.save("k", token())
        await store.close()
        with pytest.raises(EncryptionKeyError, match="encryption_key") as info:
            await SqliteStore.open(path, Codec(OTHER))
        assert KEY.get() not in str(info.value) and OTHER.get() not in str(info.value)

    async def test_previous_key_reads_during_rotation(self, tmp_path: Path) -> None:
        """An old key listed for reading opens old rows; new writes use the new key."""
        path = str(tmp_path / "t.db")
        store = await SqliteStore.open(path, Codec(KEY))
        await store.save("k", token())
        await store.close()
        store = await SqliteStore.open(path, Codec(OTHER, (KEY,)))
        assert await store.load("k") == token()
        await store.save("k", token())
        await store.close()
        store = await SqliteStore.open(path, Codec(OTHER))
        assert await store.load("k") == token()
        await store.close()

    def test_bad_key_format(self) -> None:
        """A key that is not 32 bytes of base64 is a config error naming the key."""
        with pytest.raises(ConfigError, match=r"store\.encryption_key"):
            Codec(Secret("not-base64!"))
        with pytest.raises(ConfigError, match="32 bytes"):
            Codec(Secret(base64.b64encode(b"short").decode()))

    def test_rows_cannot_be_swapped(self) -> None:
        """A sealed value is bound to its key: moving it to another key fails."""
        codec = Codec(KEY)
        sealed = codec.seal(b"value", b"a")
        with pytest.raises(EncryptionKeyError):
            codec.open(sealed, b"b")
