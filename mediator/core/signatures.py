"""Webhook signatures, shared by the signing HTTP outbound and the verifying authenticator: pure functions,
no I/O.

Standard Webhooks (https://www.standardwebhooks.com/, spec "Verifying webhook authenticity"): the signed
content is ``{webhook-id}.{webhook-timestamp}.{body}`` (the exact body bytes), the signature HMAC-SHA256
under the secret, sent as ``v1,<base64>``; ``webhook-signature`` lists several, space-separated (one per
secret while a secret is rotated). A secret is ``whsec_`` + base64 of 24 to 64 random bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # Standard Webhooks: "between 24 bytes (192 bits) and 64 bytes (512 bits)"
MAX_SECRET_BYTES = 64
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
STANDARD_HEADERS = (WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE)


def env_names(value: list[str]) -> list[str]:
    """The ``secrets_env`` list of a signer or a verifier, checked: each a plausible variable name, none twice."""
    for name in value:
        if not name or "=" in name or any(c.isspace() for c in name):
            raise ValueError(f"{name!r} is not an environment variable name")
    if len(set(value)) != len(value):
        raise ValueError("a variable is listed twice")
    return value


def decode_standard_secret(value: str) -> bytes:
    """The key bytes of a Standard Webhooks secret (``whsec_<base64>``; the prefix is optional, as in the
    reference libraries). Raises ValueError saying what is wrong, never echoing the value."""
    text = value.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a Standard Webhooks secret (whsec_ followed by base64)") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"a Standard Webhooks secret decodes to {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes, this one to {len(key)}"
        )
    return key


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The raw HMAC-SHA256 of ``id.timestamp.body``."""
    signed = msg_id.encode("utf-8") + b"." + str(timestamp).encode("ascii") + b"." + body
    return hmac.digest(key, signed, hashlib.sha256)


def standard_signature_header(keys: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` per key, space-separated, in the keys' order."""
    return " ".join(
        "v1," + base64.b64encode(standard_signature(key, msg_id, timestamp, body)).decode("ascii") for key in keys
    )


def standard_candidates(header: str) -> list[bytes]:
    """The ``v1`` signatures a ``webhook-signature`` value lists (other versions, such as the asymmetric
    ``v1a``, and entries that do not decode are skipped)."""
    out: list[bytes] = []
    for item in header.split():
        version, _, value = item.partition(",")
        if version != "v1" or not value:
            continue
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


def hmac_digest(key: bytes, body: bytes, algorithm: str) -> bytes:
    """HMAC of ``body`` with ``algorithm`` (a hashlib name: sha256, sha384, sha512)."""
    return hmac.digest(key, body, algorithm)
