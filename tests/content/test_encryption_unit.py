"""Encrypted fields, the pure pieces: our JWE compact serialization against jwcrypto (a second JOSE
implementation) both ways, rotation, wrong keys and altered values refused without quoting a value, the
encrypt and decrypt transform operations and their place in the order, and the config's errors
(``mediator check``: a variable not set is a warning, a wrong key an error with its key path)."""

from __future__ import annotations

import base64
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
from jwcrypto import jwe, jwk
from jwcrypto.common import JWException

from mediator.cli import main
from mediator.config import parse
from mediator.core.content import parsed
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import ConfigError
from mediator.core.jwe import JweError, KeyRing
from mediator.core.transform import Transform, TransformConfig, TransformError
from mediator.daemon import make_stages
from mediator.registry import load_specs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "config.toml").read_text()
OLD, NEW = os.urandom(32), os.urandom(32)
CARD = "4111111111111111"


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def ring(*keys: tuple[str, bytes]) -> KeyRing:
    return KeyRing.of("cards", list(keys))


def their_key(kid: str, key: bytes) -> jwk.JWK:
    return jwk.JWK(kty="oct", kid=kid, k=b64(key))


def their_decrypt(token: str, *keys: jwk.JWK) -> bytes:
    keyset = jwk.JWKSet()
    for key in keys:
        keyset.add(key)
    message = jwe.JWE()
    message.deserialize(token, key=keyset)
    payload: bytes = message.payload
    return payload


def their_encrypt(plaintext: bytes, kid: str, key: bytes) -> str:
    message = jwe.JWE(plaintext, protected=json.dumps({"alg": "dir", "enc": "A256GCM", "kid": kid}))
    message.add_recipient(their_key(kid, key))
    token: str = message.serialize(compact=True)
    return token


def test_our_jwe_decrypts_with_jwcrypto_and_theirs_with_ours() -> None:
    cards = ring(("2026-02", NEW), ("2025-11", OLD))
    token = cards.encrypt(CARD)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "dir", "enc": "A256GCM", "kid": "2026-02"}
    assert token.split(".")[1] == "", "dir: no encrypted key"
    assert their_decrypt(token, their_key("2026-02", NEW)) == CARD.encode()
    # A JSON value that is not a string keeps its type: cty json.
    nested = cards.encrypt({"last4": 1111, "brand": "visa"})
    assert json.loads(their_decrypt(nested, their_key("2026-02", NEW))) == {"last4": 1111, "brand": "visa"}
    assert cards.decrypt(nested) == {"last4": 1111, "brand": "visa"}
    # Theirs, under the old key: ours decrypts it (rotation: every key of the ring decrypts).
    assert cards.decrypt(their_encrypt(b"alice@example.com", "2025-11", OLD)) == "alice@example.com"
    assert cards.encrypt(CARD) != token, "a fresh IV per value"


def test_wrong_keys_and_altered_values_are_refused_without_quoting_them() -> None:
    cards = ring(("2026-02", NEW))
    token = cards.encrypt(CARD)
    protected, _, iv, ciphertext, tag = token.split(".")
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    other_header = base64.urlsafe_b64encode(b'{"alg":"dir","enc":"A256GCM","kid":"2026-02","x":1}').decode().rstrip("=")
    kw_header = b64(b'{"alg":"A256KW","enc":"A256GCM"}')
    cases = {
        "ciphertext altered": (f"{protected}..{iv}.{flipped}.{tag}", "fails authentication under kid '2026-02'"),
        "header altered": (f"{other_header}..{iv}.{ciphertext}.{tag}", "fails authentication"),
        "same kid, another key": (
            their_encrypt(CARD.encode(), "2026-02", OLD),
            "a wrong key, or the value was altered",
        ),
        "unknown kid": (their_encrypt(CARD.encode(), "2024-01", OLD), "names kid '2024-01', which keyring 'cards'"),
        "not a JWE": (CARD, "five segments"),
        "a number": (4111, "is not a JWE"),
        "another algorithm": (f"{kw_header}.x.{iv}.{ciphertext}.{tag}", "alg 'dir'"),
    }
    for what, (value, needle) in cases.items():
        with pytest.raises(JweError) as refused:
            cards.decrypt(value)
        assert needle in str(refused.value), (what, refused.value)
        assert CARD not in str(refused.value), what
    with pytest.raises(JWException):
        their_decrypt(token, their_key("2026-02", OLD))  # jwcrypto agrees: a wrong key does not decrypt


def event(data: Any) -> Envelope:
    return new_event(type="t", source="/s", data=orjson.dumps(data), content_type="application/json")


def test_encrypt_and_decrypt_operations() -> None:
    rings = {"cards": ring(("2026-02", NEW), ("2025-11", OLD))}
    seal = Transform(
        TransformConfig(encrypt=["$.card.number", "data.customer.email", "$.absent"], add={"data.card.number": "x"}),
        rings,
    )
    data = {"card": {"number": CARD, "exp": "12/29"}, "customer": {"email": "a@example.com", "name": "A"}}
    sealed = json.loads(seal.apply(event(data)).binary_data)
    assert sealed["card"]["exp"] == "12/29"
    assert sealed["customer"]["name"] == "A"
    assert "absent" not in sealed, "an absent field stays absent"
    assert their_decrypt(sealed["card"]["number"], their_key("2026-02", NEW)) == CARD.encode()
    assert their_decrypt(sealed["customer"]["email"], their_key("2026-02", NEW)) == b"a@example.com"
    # The inverse, first in the order: the other operations see the clear value.
    unseal = Transform(
        TransformConfig(decrypt=["$.card.number", "$.customer.email"], promote={"data.customer.email": "email"}),
        rings,
    )
    opened = unseal.apply(event(sealed))
    assert json.loads(opened.binary_data) == data
    assert opened.attributes["email"].ce_string == "a@example.com"
    # Encrypt is last: what jsonata builds is encrypted too.
    built = Transform(
        TransformConfig(jsonata='{"card": {"number": card.number & ""}}', encrypt=["$.card.number"]), rings
    )
    assert rings["cards"].decrypt(json.loads(built.apply(event(data)).binary_data)["card"]["number"]) == CARD
    with pytest.raises(TransformError) as failed:
        unseal.apply(event({"card": {"number": CARD}}))
    assert str(failed.value) == "decrypt data.card.number: is not a JWE compact serialization (five segments)"
    assert data == json.loads(unseal.apply(event(sealed), parsed).binary_data)


def config_with(extra: str) -> str:
    return SHIPPED + "\n" + extra


SEALED_ROUTE = """
[[routes]]
name = "sealed"
match = { type = ["com.example.card"] }
to = [{ outbound = "orders-exchange", address = "sealed", transform = { encrypt = ["$.card.number"]%s } }]
"""


def test_config_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def problems(text: str) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            parse(tomllib.loads(text), load_specs(), str(tmp_path / "config.toml"))
        return exc.value.problems

    monkeypatch.setenv("T_KEY_NEW", b64(NEW))
    monkeypatch.setenv("T_KEY_SHORT", b64(os.urandom(16)))
    monkeypatch.setenv("T_KEY_JUNK", "not base64!")
    ok = config_with('[encryption.cards]\nkeys = [{ kid = "n", env = "T_KEY_NEW" }]\n' + SEALED_ROUTE % "")
    config = parse(tomllib.loads(ok), load_specs(), str(tmp_path / "config.toml"))
    assert config.keyrings["cards"].encrypt_kid == "n"
    assert config.environment == ()
    bad = '[encryption.cards]\nkeys = [{ kid = "s", env = "T_KEY_SHORT" }, { kid = "j", env = "T_KEY_JUNK" }]\n'
    found = problems(config_with(bad + SEALED_ROUTE % ""))
    assert (
        "encryption.cards.keys[0].env: variable T_KEY_SHORT holds 16 bytes; AES-256-GCM needs a key of exactly 32"
        in found
    )
    assert any(p.startswith("encryption.cards.keys[1].env: variable T_KEY_JUNK is not base64url") for p in found), found
    assert not any("not base64!" in p for p in found), "a key's value never reaches a message"
    assert problems(config_with(SEALED_ROUTE % "")) == [
        'routes["sealed"].to[0].transform.encrypt/decrypt: name the keyring ([encryption.NAME] rings: none)'
    ]
    assert problems(config_with(ok.split("[[routes]]")[0][len(SHIPPED) :] + SEALED_ROUTE % ', keyring = "other"')) == [
        'routes["sealed"].to[0].transform.keyring: no [encryption.other]'
    ]
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{"kty": "oct", "kid": "f", "k": b64(NEW)[:-4]}]}))
    found = problems(config_with('[encryption.cards]\nkeys_file = "keys.json"\n'))
    assert found == ["encryption.cards.keys_file: keys[0]: k holds 29 bytes; AES-256-GCM needs a key of exactly 32"]
    monkeypatch.delenv("T_KEY_NEW")
    config = parse(tomllib.loads(ok), load_specs(), str(tmp_path / "config.toml"))
    assert config.environment == ("encryption.cards.keys[0].env: variable T_KEY_NEW is not set",)


def test_mediator_check_and_run_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config_with('[encryption.cards]\nkeys = [{ kid = "n", env = "T_CARD_KEY" }]\n' + SEALED_ROUTE % ""))
    monkeypatch.delenv("T_CARD_KEY", raising=False)
    assert main(["check", "--config", str(path)]) == 0  # check may run where the secrets are not
    warned = capsys.readouterr().err
    assert "warning: encryption.cards.keys[0].env: variable T_CARD_KEY is not set (needed by `mediator run`)" in warned
    with pytest.raises(ConfigError) as refused:  # what `mediator run` (and a reload) builds first
        make_stages(parse(tomllib.loads(path.read_text()), load_specs(), str(path)))
    assert refused.value.file == "environment"
    assert refused.value.problems == ["encryption.cards.keys[0].env: variable T_CARD_KEY is not set"]
    monkeypatch.setenv("T_CARD_KEY", b64(os.urandom(31)))
    assert main(["check", "--config", str(path)]) == 2
    assert "encryption.cards.keys[0].env: variable T_CARD_KEY holds 31 bytes" in capsys.readouterr().err
