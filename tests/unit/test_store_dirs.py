"""The SQLite store creates the directories that hold it private, every level of them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from broker.crypto import Codec
from broker.stores.sqlite import SqliteStore


async def test_every_missing_level_is_0700_under_umask_0(tmp_path: Path) -> None:
    """Under umask 0, each directory the store creates is 0700 (Path.mkdir(parents=True)
    would leave the upper ones 0777); a directory that existed keeps its mode."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "a" / "b" / "c" / "tokens.db"
    old = os.umask(0)
    try:
        store = await SqliteStore.open(str(path), Codec())
        await store.close()
    finally:
        os.umask(old)
    modes = {
        str(level.relative_to(tmp_path)): stat.S_IMODE(os.stat(level).st_mode)
        for level in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c")
    }
    assert modes == {"a": 0o700, "a/b": 0o700, "a/b/c": 0o700}
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
