"""The default store: one SQLite file (on an emptyDir in Kubernetes), created private."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import aiosqlite

from ..credential import Token
from ..crypto import Codec
from ..errors import EncryptionKeyError, StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens
    (key TEXT PRIMARY KEY, value BLOB NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS blobs
    (key TEXT PRIMARY KEY, value BLOB NOT NULL, updated_at REAL NOT NULL);
"""


def _make_private_dirs(directory: Path) -> None:
    """Create every missing level of ``directory`` 0700, whatever the umask.

    ``Path.mkdir(parents=True, mode=0o700)`` gives the mode to the last level only: under
    umask 0 its parents would be world-writable, and anyone on the host could swap the
    directory that holds the token store. Levels that exist are left as they are.
    """
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else: not ours to change
        os.chmod(level, 0o700)  # the umask may have taken bits off mkdir's mode


class SqliteStore:
    """Tokens in a SQLite file. Every save is committed (fsynced) before it returns."""

    def __init__(self, db: aiosqlite.Connection, path: str, codec: Codec, timeout: float) -> None:
        self._db = db
        self.path = path
        self._codec = codec
        self._timeout = timeout
        self._lock = asyncio.Lock()

    @property
    def shared(self) -> bool:
        return False

    @classmethod
    async def open(cls, path: str, codec: Codec, *, timeout: float = 2.0) -> SqliteStore:
        """Create or open the file (0600, directory 0700 if we create it) and check the key."""
        file = Path(path)
        try:
            _make_private_dirs(file.parent)
            # Create the file private before SQLite opens it; SQLite keeps the mode.
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(file, 0o600)
            db = await aiosqlite.connect(file, timeout=timeout)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the token store {path}: {exc}") from None
        try:
            # WAL + FULL: a committed token survives kill -9 and power loss alike.
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(_SCHEMA)
            await db.commit()
            for sidecar in ("-wal", "-shm"):
                side = Path(str(file) + sidecar)
                if side.exists():
                    os.chmod(side, 0o600)
            store = cls(db, str(file), codec, timeout)
            await store._check_key()
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"cannot use the token store {path}: {exc}") from None
        except EncryptionKeyError:
            await db.close()
            raise
        return store

    async def _check_key(self) -> None:
        async with self._db.execute("SELECT key, value FROM tokens") as cursor:
            async for key, value in cursor:
                self._codec.open(bytes(value), str(key).encode())

    async def load(self, key: str) -> Token | None:
        try:
            async with self._db.execute("SELECT value FROM tokens WHERE key = ?", (key,)) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"token store read failed: {exc}") from None
        if row is None:
            return None
        return Token.from_json(self._codec.open(bytes(row[0]), key.encode()))

    async def save(self, key: str, token: Token) -> None:
        await self._put("tokens", key, self._codec.seal(token.to_json(), key.encode()))

    async def delete(self, key: str) -> None:
        async with self._lock:
            try:
                await self._db.execute("DELETE FROM tokens WHERE key = ?", (key,))
                await self._db.commit()
            except sqlite3.Error as exc:
                raise StoreError(f"token store delete failed: {exc}") from None

    async def get_blob(self, key: str) -> bytes | None:
        async with self._db.execute("SELECT value FROM blobs WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else bytes(row[0])

    async def put_blob(self, key: str, value: bytes) -> None:
        await self._put("blobs", key, value)

    async def _put(self, table: str, key: str, value: bytes) -> None:
        async with self._lock:
            try:
                await self._db.execute(
                    f"INSERT INTO {table} (key, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at",
                    (key, value, time.time()),
                )
                await self._db.commit()
            except sqlite3.Error as exc:
                raise StoreError(f"token store write failed: {exc}") from None

    async def close(self) -> None:
        await self._db.close()
