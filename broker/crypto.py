"""Tokens at rest: AES-GCM with a key id, so a wrong key is an error, never garbage.

A sealed value is ``b"EB1" + key_id (8 bytes) + nonce (12 bytes) + ciphertext``. The key id is
a digest of the key, so the broker can tell "encrypted with a key I don't have" from "corrupt"
and name ``encryption_key`` in the error. Older keys may be listed for reading during a key
rotation; new writes always use the current key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import TYPE_CHECKING

from .errors import ConfigError, EncryptionKeyError
from .secrets import Secret

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"EB1"
_ID_LEN = 8
_NONCE_LEN = 12


def _decode_key(secret: Secret, what: str) -> bytes:
    try:
        raw = base64.b64decode(secret.get().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            [f"store.{what}: must be 32 random bytes in base64 (openssl rand -base64 32)"]
        ) from None
    if len(raw) != 32:
        raise ConfigError(
            [f"store.{what}: must decode to 32 bytes, not {len(raw)} (openssl rand -base64 32)"]
        )
    return raw


def _aead(key: bytes) -> AESGCM:
    # Imported on first use: without encryption_key the broker never loads cryptography
    # (about 6 MiB of resident memory; bench/RESULTS.md).
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"erp-broker key id\0" + key).digest()[:_ID_LEN]


class Codec:
    """Seals and opens stored values; without a key it stores plain bytes."""

    def __init__(self, key: Secret | None = None, previous: tuple[Secret, ...] = ()) -> None:
        self._keys: dict[bytes, AESGCM] = {}
        self._current: tuple[bytes, AESGCM] | None = None
        if key is not None:
            raw = _decode_key(key, "encryption_key")
            self._current = (_key_id(raw), _aead(raw))
            self._keys[self._current[0]] = self._current[1]
        for index, old in enumerate(previous):
            raw = _decode_key(old, f"previous_encryption_keys.{index}")
            self._keys.setdefault(_key_id(raw), _aead(raw))

    @property
    def encrypted(self) -> bool:
        return self._current is not None

    def seal(self, plain: bytes, associated: bytes) -> bytes:
        if self._current is None:
            return plain
        key_id, aead = self._current
        nonce = os.urandom(_NONCE_LEN)
        return MAGIC + key_id + nonce + aead.encrypt(nonce, plain, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plain value; ``associated`` binds it to its store key (no swapping rows)."""
        if not sealed.startswith(MAGIC):
            # Written before a key was configured: readable, re-sealed on the next write.
            return sealed
        if not self._keys:
            raise EncryptionKeyError(
                "stored tokens are encrypted but no store.encryption_key is configured"
            )
        key_id = sealed[len(MAGIC) : len(MAGIC) + _ID_LEN]
        aead = self._keys.get(key_id)
        if aead is None:
            raise EncryptionKeyError(
                "stored tokens were encrypted with a different store.encryption_key "
                "(list the old key under store.previous_encryption_keys to rotate)"
            )
        from cryptography.exceptions import InvalidTag

        body = sealed[len(MAGIC) + _ID_LEN :]
        try:
            return aead.decrypt(body[:_NONCE_LEN], body[_NONCE_LEN:], associated)
        except InvalidTag:
            raise EncryptionKeyError(
                "a stored token failed authentication: the store was tampered with or "
                "store.encryption_key is wrong"
            ) from None
