"""Webhook signing and verification: what `mediator check` refuses (inline secrets, webhook authenticators
where no signed body arrives), and the pure logic a daemon would blur: signatures against the
``standardwebhooks`` reference library, the verifier's refusals, the bounded replay cache, the
handshake answer's reading."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from adapters.http.outbound import parse_consent
from mediator.core import signatures
from mediator.core.errors import ConfigError, NotReady, RejectCode, Rejected
from mediator.stages.config import WebhookAuthConfig
from mediator.stages.webhooks import WebhookAuthenticator
from tests.security.test_config_security import SHIPPED, check


def whsec(n: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(n)).decode()


HOOK = '[auth.h]\nkind = "webhook"\nscheme = "github"\nsecrets_env = ["T_GH"]\nprincipal = "github"\n'
CASES = {
    "inline-webhook-secret": (HOOK + 'secret = "hunter2hunter2hunter2"\n', ["auth.h", "inline secrets are refused"]),
    "inline-signing-secret": (
        '[outbound.w]\nkind = "http"\nurl = "https://example.com"\n'
        'sign = { kind = "standard-webhooks", secret = "whsec_abc" }\n',
        ["outbound.w.sign", "inline secrets are refused (secret)"],
    ),
    "webhook-on-grpc": (HOOK, ["inbound.grpc.auth[0]", "verifies signed HTTP requests only"]),
    "webhook-on-a-listener": (HOOK, ["listeners.http.auth[0]", "name it in the auth of each HTTP inbound"]),
    "hmac-without-header": (
        '[auth.h]\nkind = "webhook"\nscheme = "hmac"\nsecrets_env = ["T"]\nprincipal = "p"\n',
        ["auth.h", "scheme = 'hmac' needs header"],
    ),
    "tolerance-on-github": (HOOK + "tolerance_s = 10.0\n", ["tolerance_s and replay_cache_size are for"]),
    "handshake-on-plain": (
        '[inbound.x]\nkind = "http"\nlistener = "http"\npath = "/x"\ntype = "t"\nsource = "/x"\n'
        'handshake = { allowed_origins = ["*"] }\n',
        ["inbound.x", "handshake is answered by mode = 'cloudevents' inbounds"],
    ),
    "handshake-origin-without-handshake": (
        '[outbound.w]\nkind = "http"\nurl = "https://example.com"\nhandshake_origin = "me.example.com"\n',
        ["outbound.w", "handshake_origin need handshake = true"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_refuses(tmp_path: Path, case: str) -> None:
    extra, expected = CASES[case]
    text = SHIPPED + "\n" + extra
    if case == "webhook-on-grpc":
        text = text.replace('[inbound.grpc]              # flow 4: Publish and PublishStream\nkind = "grpc"\n',
                            '[inbound.grpc]\nkind = "grpc"\nauth = ["h"]\n', 1)  # fmt: skip
        assert 'auth = ["h"]' in text
    if case == "webhook-on-a-listener":
        text = text.replace("port = 8080 ", 'auth = ["h"]\nport = 8080 ', 1)
    result = check(tmp_path, text)
    assert result.returncode == 2, (result.stdout, result.stderr)
    for fragment in expected:
        assert fragment in result.stderr, result.stderr


def test_check_warns_of_unset_secret_variables_and_never_shows_a_value(tmp_path: Path) -> None:
    text = SHIPPED.replace(
        '[inbound.orders-http]       # flow 1: POST /orders with a JSON body\nkind = "http"\n',
        '[inbound.orders-http]\nkind = "http"\nauth = ["h"]\n',
        1,
    )
    assert 'auth = ["h"]' in text
    text += "\n" + HOOK.replace('["T_GH"]', '["T_UNSET_GH_SECRET"]')
    text += (
        '\n[outbound.w]\nkind = "http"\nurl = "https://example.com"\n'
        'sign = { kind = "standard-webhooks", secrets_env = ["T_UNSET_SIGN", "T_SHORT_SIGN"] }\n'
    )
    os.environ.pop("T_UNSET_GH_SECRET", None)
    os.environ.pop("T_UNSET_SIGN", None)
    short = "whsec_" + base64.b64encode(b"0123456789").decode()
    os.environ["T_SHORT_SIGN"] = short
    try:
        result = check(tmp_path, text)
    finally:
        del os.environ["T_SHORT_SIGN"]
    assert result.returncode == 0, result.stderr  # check may run where the secrets are not
    assert "auth.h.secrets_env (T_UNSET_GH_SECRET): variable T_UNSET_GH_SECRET is not set" in result.stderr
    assert "outbound.w.sign.secrets_env (T_UNSET_SIGN): variable T_UNSET_SIGN is not set" in result.stderr
    assert "outbound.w.sign.secrets_env (T_SHORT_SIGN): a Standard Webhooks secret decodes to 24-64 bytes" in (
        result.stderr
    )
    assert short not in result.stderr


def test_signature_header_is_what_the_reference_library_signs() -> None:
    new, old = whsec(), whsec(24)
    keys = (signatures.decode_standard_secret(new), signatures.decode_standard_secret(old[len("whsec_") :]))
    body = '{"a": "h\u00e9"}'.encode()
    stamp = 1_765_000_000
    header = signatures.standard_signature_header(keys, "msg_1", stamp, body)
    when = datetime.fromtimestamp(stamp, tz=UTC)
    assert header == " ".join(Webhook(s).sign("msg_1", when, body.decode()) for s in (new, old))
    for bad in ("whsec_!!notbase64", "whsec_" + base64.b64encode(b"short").decode(), ""):
        with pytest.raises(ValueError, match="Standard Webhooks secret"):
            signatures.decode_standard_secret(bad)


def authenticator(secret: str, **cfg: object) -> WebhookAuthenticator:
    config = WebhookAuthConfig.model_validate(
        {"kind": "webhook", "scheme": "standard-webhooks", "secrets_env": ["S"], "principal": "p", **cfg}
    )
    auth = WebhookAuthenticator("h", config)
    auth.load_sync({"S": secret})
    return auth


def signed(secret: str, msg_id: str, stamp: int, body: bytes) -> dict[str, str]:
    sig = Webhook(secret).sign(msg_id, datetime.fromtimestamp(stamp, tz=UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": sig}


def test_standard_webhooks_verifier() -> None:
    secret = whsec()
    auth = authenticator(secret, tolerance_s=60.0)
    now = int(time.time())
    body = b'{"x": 1}'
    headers = signed(secret, "m1", now, body)
    auth.check_headers(headers)
    assert auth.verify(headers, body).id == "p"
    refusals = {
        "replay": (headers, body),
        "tampered body": (signed(secret, "m2", now, body), b'{"x": 2}'),
        "other secret": (signed(whsec(), "m3", now, body), body),
        "stale": (signed(secret, "m4", now - 90, body), body),
        "future": (signed(secret, "m5", now + 90, body), body),
        "fractional timestamp": ({**signed(secret, "m6", now, body), "webhook-timestamp": f"{now}.5"}, body),
        "v1a only": ({**signed(secret, "m7", now, body), "webhook-signature": "v1a,AAAA"}, body),
    }
    for what, (h, b) in refusals.items():
        with pytest.raises(Rejected) as caught:
            auth.verify(h, b)
        assert caught.value.code is RejectCode.UNAUTHENTICATED, what
    # Several signatures listed (the sender mid-rotation): one match is enough.
    rotated = signed(secret, "m8", now, body)
    rotated["webhook-signature"] = (
        "v1,AAAA "
        + signed(whsec(), "m8", now, body)["webhook-signature"].split()[0]
        + (" " + rotated["webhook-signature"])
    )
    assert auth.verify(rotated, body).id == "p"
    assert auth.remembered == 2


def test_replay_cache_is_bounded_and_refuses_rather_than_forgets() -> None:
    secret = whsec()
    auth = authenticator(secret, replay_cache_size=3)
    now = int(time.time())
    for i in range(3):
        auth.verify(signed(secret, f"m{i}", now, b"{}"), b"{}")
    with pytest.raises(NotReady, match="replay cache full"):
        auth.verify(signed(secret, "m3", now, b"{}"), b"{}")
    with pytest.raises(Rejected, match="replay"):
        auth.verify(signed(secret, "m0", now, b"{}"), b"{}")  # still remembered: never forgotten to make room


def test_github_and_hmac_verifiers() -> None:
    secret = "github-secret-0123456789"
    config = WebhookAuthConfig.model_validate(
        {"kind": "webhook", "scheme": "github", "secrets_env": ["OLD", "NEW"], "principal": "github"}
    )
    gh = WebhookAuthenticator("gh", config)
    gh.load_sync({"OLD": "old-secret-0123456789", "NEW": secret})
    body = b'{"zen": "Keep it logically awesome."}'
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert gh.verify({"x-hub-signature-256": "sha256=" + digest}, body).id == "github"
    assert gh.verify({"x-hub-signature-256": "sha256=" + digest.upper()}, body).id == "github"
    for value in ("sha256=" + digest[:-2], digest, "sha256=zz", "sha1=" + digest):
        with pytest.raises(Rejected):
            gh.verify({"x-hub-signature-256": value}, body)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        gh.load_sync({"OLD": "short", "NEW": secret})

    config = WebhookAuthConfig.model_validate(
        {
            "kind": "webhook",
            "scheme": "hmac",
            "header": "X-Sig",
            "algorithm": "sha512",
            "encoding": "base64",
            "prefix": "v=",
            "secrets_env": ["K"],
            "principal": "partner",
        }
    )
    generic = WebhookAuthenticator("g", config)
    generic.load_sync({"K": "partner-secret-0123"})
    mac = base64.b64encode(hmac.new(b"partner-secret-0123", body, hashlib.sha512).digest()).decode()
    assert generic.headers == ("x-sig",)
    assert generic.verify({"x-sig": "v=" + mac}, body).id == "partner"
    with pytest.raises(Rejected, match="does not start with"):
        generic.verify({"x-sig": mac}, body)


def test_handshake_answers_read_as_the_spec_says() -> None:
    me = "mediator.example.com"
    assert parse_consent(200, ["mediator.example.com"], ["120"], me, None) == (True, "", 0.5)
    assert parse_consent(200, ["MEDIATOR.example.com"], [], me, None)[0] is True
    assert parse_consent(204, ["*"], ["*"], me, 60) == (True, "", 0.0)
    assert parse_consent(200, [], [], me, None)[0] is False  # a 2xx alone is no consent
    assert parse_consent(200, ["other.example.com"], [], me, None)[0] is False
    assert parse_consent(200, [me], [], me, 60)[0] is False  # a rate asked needs a rate granted
    assert parse_consent(200, [me], ["-1"], me, None)[0] is False
    assert parse_consent(405, [], [], me, None)[1].startswith("HTTP 405")
