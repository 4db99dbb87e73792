"""An identity provider for tests: RSA signing keys, a JWKS endpoint on loopback that counts its fetches,
and tokens signed with PyJWT."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://issuer.test/"
AUDIENCE = "mediator"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def jwk(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        data.update(kid=self.kid, use="sig", alg="RS256")
        return data

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class Issuer:
    """Serves ``/jwks.json`` (the keys in ``published``) and counts the GETs in ``fetches``."""

    def __init__(self) -> None:
        self.key = SigningKey("k1")
        self.published: list[SigningKey] = [self.key]
        self.fetches = 0
        self.fail = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.fail:
            return web.Response(status=503)
        return web.json_response({"keys": [k.jwk() for k in self.published]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def token(
        self,
        sub: str = "alice",
        *,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        omit: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        """A valid RS256 token for ``sub`` unless the arguments spoil it; ``omit`` drops default claims."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        body.update(claims)
        for name in omit:
            body.pop(name, None)
        signer = key or self.key
        return jwt.encode(body, signer.private, algorithm="RS256", headers={"kid": signer.kid, **(headers or {})})
