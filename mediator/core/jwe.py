"""Field encryption: one JSON value as a JWE compact serialization (RFC 7516 section 7.1), ``alg: dir``
with ``enc: A256GCM`` (RFC 7518 sections 4.5 and 5.3), the key named by ``kid`` in the protected header.

With direct encryption the compact form is five segments ``protected..iv.ciphertext.tag`` (the encrypted
key is empty) and the AAD is the ASCII of the protected segment, so a few lines over ``cryptography``'s
AES-GCM are the whole format; any JOSE library (jwcrypto, jose4j, node-jose, ...) decrypts what this writes
given the same 256-bit key, and this decrypts what they write. Pure: no I/O (the keys are loaded by
``mediator.stages.keyring``).

A string is encrypted as its UTF-8 bytes, so a consumer's JOSE library hands back the string itself; any
other JSON value (a number, an object) as its JSON text, with ``cty: "json"`` in the header so that
``decrypt`` gives back the same value and type. Every value gets a fresh random 96-bit IV: NIST SP 800-38D
bounds one key to 2^32 random IVs, so rotate a key long before four billion encryptions.

Errors never quote a value, clear or encrypted: a reason goes to logs and dead letters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mediator.core.envelope import shown

KEY_BYTES = 32
IV_BYTES = 12
TAG_BYTES = 16
ALG, ENC, JSON_CTY = "dir", "A256GCM", "json"


class JweError(Exception):
    """A value cannot be decrypted (or a key is unusable); the message says why, never what the value was."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Base64url without padding (RFC 7515 section 2), padding tolerated; raises ValueError."""
    if not text.isascii() or any(c in text for c in "+/ \n"):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def parse_key(text: str) -> bytes:
    """A 256-bit key written in base64url (as a JWK's ``k``); raises ValueError saying what is wrong."""
    try:
        key = unb64url(text.strip())
    except ValueError:
        raise ValueError(
            "is not base64url (a JWK's 'k': 32 random bytes, e.g. from `openssl rand 32 | basenc --base64url`)"
        ) from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"holds {len(key)} bytes; AES-256-GCM needs a key of exactly {KEY_BYTES}")
    return key


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Named keys: ``encrypt_kid``'s encrypts, any of them decrypts what names its ``kid``."""

    name: str
    keys: Mapping[str, bytes]
    encrypt_kid: str

    @classmethod
    def of(cls, name: str, keys: Sequence[tuple[str, bytes]], encrypt_kid: str | None = None) -> KeyRing:
        ring = dict(keys)
        kid = encrypt_kid if encrypt_kid is not None else (keys[0][0] if keys else "")
        return cls(name, ring, kid)

    @property
    def fingerprint(self) -> str:
        """What tells two rings apart (a reload compares them), without holding the key bytes."""
        digest = hashlib.sha256()
        for kid in sorted(self.keys):
            digest.update(kid.encode() + b"\0" + self.keys[kid])
        return f"{self.encrypt_kid}:{digest.hexdigest()}"

    def encrypt(self, value: Any) -> str:
        """``value`` (any JSON value) as a JWE compact serialization under the encrypting key."""
        key = self.keys.get(self.encrypt_kid)
        if key is None:
            raise JweError(f"keyring {self.name!r} has no key to encrypt with")
        header: dict[str, str] = {"alg": ALG, "enc": ENC, "kid": self.encrypt_kid}
        if isinstance(value, str):
            plaintext = value.encode("utf-8")
        else:
            header["cty"] = JSON_CTY
            plaintext = orjson.dumps(value)
        protected = b64url(orjson.dumps(header))
        iv = os.urandom(IV_BYTES)
        sealed = AESGCM(key).encrypt(iv, plaintext, protected.encode("ascii"))
        return f"{protected}..{b64url(iv)}.{b64url(sealed[:-TAG_BYTES])}.{b64url(sealed[-TAG_BYTES:])}"

    def decrypt(self, token: object) -> Any:
        """The value a JWE compact serialization holds: a string, or with ``cty: "json"`` the JSON value."""
        if not isinstance(token, str):
            raise JweError("is not a JWE (a string of five base64url segments)")
        parts = token.split(".")
        if len(parts) != 5:
            raise JweError("is not a JWE compact serialization (five segments)")
        protected, encrypted_key, iv_b64, ct_b64, tag_b64 = parts
        try:
            header = orjson.loads(unb64url(protected))
            iv, ciphertext, tag = unb64url(iv_b64), unb64url(ct_b64), unb64url(tag_b64)
        except ValueError:
            raise JweError("is not a JWE: a segment is not base64url (or the header not JSON)") from None
        if not isinstance(header, dict):
            raise JweError("is not a JWE: the protected header is not a JSON object")
        if header.get("alg") != ALG or header.get("enc") != ENC or encrypted_key:
            raise JweError(
                f"is not alg 'dir' + enc 'A256GCM' (header says alg {_said(header.get('alg'))}, "
                f"enc {_said(header.get('enc'))})"
            )
        if "crit" in header or "zip" in header:
            raise JweError("uses a header parameter this gateway does not implement (crit or zip)")
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise JweError(f"names kid {_said(kid)}, which keyring {self.name!r} does not hold")
        if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
            raise JweError("is not a JWE: a 96-bit IV and a 128-bit tag are expected")
        try:
            plaintext = AESGCM(key).decrypt(iv, ciphertext + tag, protected.encode("ascii"))
        except InvalidTag:
            raise JweError(
                f"fails authentication under kid {_said(kid)}: a wrong key, or the value was altered"
            ) from None
        cty = header.get("cty")
        if cty is not None and str(cty).lower() in (JSON_CTY, "application/json"):
            try:
                return orjson.loads(plaintext)
            except orjson.JSONDecodeError:
                raise JweError("says cty 'json' but its plaintext is not JSON") from None
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise JweError("holds a plaintext that is not UTF-8 text") from None


def _said(value: object) -> str:
    """A header parameter as a reason quotes it: bounded, whatever the sender put there."""
    return shown(value) if isinstance(value, str) else shown(str(value))
