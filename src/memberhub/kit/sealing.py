"""The master secret sealed with a passphrase, for keeping it apart from the service.

A sealed secret is a small JSON document: scrypt turns the passphrase into an AES-256-GCM
key (a new random salt each time), which encrypts the secret. Nothing in the document
reveals the secret without the passphrase, and a wrong passphrase or an edited document
fails authentication rather than yielding a wrong key.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

FORMAT = "memberhub-sealed-secret"
VERSION = 1
MIN_PASSPHRASE_LENGTH = 12
# scrypt's cost: about 0.1 s and 32 MiB per attempt, which makes guessing expensive.
_SCRYPT_N = 2**15
_SCRYPT_R = 8
_SCRYPT_P = 1


class SealError(ValueError):
    """A sealed secret cannot be opened: wrong passphrase, damaged or not a sealed secret."""


def _kdf(salt: bytes, n: int, r: int, p: int) -> Scrypt:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p)


def seal_secret(secret: str, passphrase: str) -> bytes:
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise SealError(f"the passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
    salt = os.urandom(16)
    nonce = os.urandom(12)
    key = _kdf(salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P).derive(passphrase.encode())
    ciphertext = AESGCM(key).encrypt(nonce, secret.encode(), FORMAT.encode())
    document = {
        "format": FORMAT,
        "version": VERSION,
        "kdf": {"name": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P},
        "salt": base64.b64encode(salt).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def open_secret(sealed: bytes, passphrase: str) -> str:
    try:
        document: Any = json.loads(sealed)
    except ValueError:
        raise SealError("not a sealed secret (it is not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SealError("not a sealed secret")
    if document.get("version") != VERSION:
        raise SealError(f"sealed secret version {document.get('version')!r} is not supported")
    try:
        kdf = document["kdf"]
        if kdf["name"] != "scrypt":
            raise SealError(f"unknown key derivation {kdf['name']!r}")
        salt = base64.b64decode(document["salt"], validate=True)
        nonce = base64.b64decode(document["nonce"], validate=True)
        ciphertext = base64.b64decode(document["ciphertext"], validate=True)
        key = _kdf(salt, int(kdf["n"]), int(kdf["r"]), int(kdf["p"])).derive(passphrase.encode())
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SealError):
            raise
        raise SealError("the sealed secret is damaged") from None
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, FORMAT.encode()).decode()
    except (InvalidTag, ValueError):
        raise SealError("wrong passphrase, or the sealed secret was altered") from None
