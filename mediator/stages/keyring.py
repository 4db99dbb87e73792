"""The key rings of ``[encryption.NAME]``, read when a config is loaded (at start-up, or in the reload's
thread: never on the event loop): environment variables or a JWK Set file.

A problem of the file or of a variable's value is a config problem (``mediator check`` fails); a variable
that is not set is an environment problem, reported apart, as for every secret: ``check`` may run where
the secrets are not, and ``mediator run`` refuses to start without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mediator.core.jwe import KeyRing, parse_key
from mediator.stages.content_config import EncryptionConfig


@dataclass(slots=True)
class Loaded:
    rings: dict[str, KeyRing] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)


def load_keyrings(configs: Mapping[str, EncryptionConfig], base_dir: Path) -> Loaded:
    out = Loaded()
    for name, cfg in configs.items():
        where = f"encryption.{name}"
        keys: list[tuple[str, bytes]] = []
        if cfg.keys_file is not None:
            keys = _file_keys(base_dir / cfg.keys_file, f"{where}.keys_file", out.problems)
        for i, entry in enumerate(cfg.keys):
            value = os.environ.get(entry.env)
            if value is None:
                out.environment.append(f"{where}.keys[{i}].env: variable {entry.env} is not set")
                continue
            try:
                keys.append((entry.kid, parse_key(value)))
            except ValueError as exc:
                out.problems.append(f"{where}.keys[{i}].env: variable {entry.env} {exc}")
        if cfg.keys_file is not None and not keys and not out.problems:
            out.problems.append(f"{where}.keys_file: holds no key")
        kids = [k for k, _ in keys]
        if cfg.encrypt_kid is not None and cfg.keys_file is not None and keys and cfg.encrypt_kid not in kids:
            out.problems.append(f"{where}.encrypt_kid: {cfg.encrypt_kid!r} is no kid of {cfg.keys_file}")
        # With a variable missing the ring is built from the rest: only `check` sees it, `run` refuses.
        first = cfg.keys[0].kid if cfg.keys else (kids[0] if kids else "")
        out.rings[name] = KeyRing.of(name, keys, cfg.encrypt_kid or first)
    return out


def _file_keys(path: Path, where: str, problems: list[str]) -> list[tuple[str, bytes]]:
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        problems.append(f"{where}: cannot read {path}: {exc.strerror or exc}")
        return []
    except ValueError:
        problems.append(f'{where}: {path} is not JSON (a JWK Set: {{"keys": [...]}})')
        return []
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        problems.append(f"{where}: {path} is not a JWK Set (no 'keys' list)")
        return []
    keys: list[tuple[str, bytes]] = []
    for i, jwk in enumerate(entries):
        at = f"{where}: keys[{i}]"
        if not isinstance(jwk, dict) or jwk.get("kty") != "oct":
            problems.append(f"{at}: not a symmetric key (kty 'oct')")
            continue
        kid, k = jwk.get("kid"), jwk.get("k")
        if not isinstance(kid, str) or not kid:
            problems.append(f"{at}: needs a kid (written in each JWE's header)")
            continue
        if jwk.get("alg") not in (None, "A256GCM", "dir"):
            problems.append(f"{at}: alg {jwk.get('alg')!r} is not A256GCM")
            continue
        try:
            key = parse_key(k if isinstance(k, str) else "")
        except ValueError as exc:
            problems.append(f"{at}: k {exc}")
            continue
        if kid in dict(keys):
            problems.append(f"{at}: kid {kid!r} is listed twice")
            continue
        keys.append((kid, key))
    return keys
