"""Secrets at rest: AES-GCM with a key derived from the installation's master secret."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_PREFIX = "enc1"
_NONCE_BYTES = 12


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted: it was written under another master secret."""


class SecretBox:
    """Encrypts short secrets for storage. The stored form names the key it was written with
    (a fingerprint of the derived key, never the key), so a rotation can tell old from new."""

    def __init__(self, master_secret: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"memberhub secrets v1"
        ).derive(master_secret.encode())
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(key).hexdigest()[:8]

    def encrypt(self, plaintext: str) -> str:
        raw = base64.urlsafe_b64encode(self._seal(plaintext.encode())).decode()
        return f"{_PREFIX}:{self.key_id}:{raw}"

    def decrypt(self, stored: str) -> str:
        try:
            prefix, key_id, body = stored.split(":", 2)
            if prefix != _PREFIX or key_id != self.key_id:
                raise SecretUnreadable("the secret was encrypted with another master secret")
            return self._open(base64.urlsafe_b64decode(body.encode())).decode()
        except ValueError as exc:
            raise SecretUnreadable("the stored secret is damaged or from another key") from exc

    def seal(self, data: bytes) -> bytes:
        """Binary form, for larger values such as stored API responses."""
        return f"{_PREFIX}:{self.key_id}:".encode() + self._seal(data)

    def open(self, stored: bytes) -> bytes:
        """The data `seal` sealed; anything not sealed (written before sealing) as it is."""
        head = f"{_PREFIX}:".encode()
        if not stored.startswith(head):
            return stored
        key_id, _, raw = stored[len(head) :].partition(b":")
        if key_id.decode(errors="replace") != self.key_id:
            raise SecretUnreadable("the data was sealed with another master secret")
        return self._open(raw)

    def _seal(self, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, self.key_id.encode())

    def _open(self, raw: bytes) -> bytes:
        try:
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self.key_id.encode())
        except InvalidTag as exc:
            raise SecretUnreadable("the sealed data is damaged or from another key") from exc
