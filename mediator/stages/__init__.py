"""The ingress stages (protocol-neutral): authenticate, authorize, rate limit; content stages plug in after.

``build`` turns a validated config into the ordered stage list the pipeline runs; ``problems`` finds what
only the combination of sections can show (an inbound naming a missing authenticator, a public listener
without authentication), for ``mediator check`` and start-up alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from mediator.core.ingress import Stage
from mediator.core.jwe import KeyRing
from mediator.core.seams import AdapterConfig, InboundConfigBase, ListenerConfigBase
from mediator.stages.authn import (
    ApiKeyAuthenticator,
    Authenticate,
    Authenticator,
    BrokerAuthenticator,
    JwtAuthenticator,
    MtlsAuthenticator,
    Policy,
)
from mediator.stages.authz import Authorize
from mediator.stages.config import (
    ApiKeyAuthConfig,
    AuthenticatorConfig,
    AuthorizationRuleConfig,
    BrokerAuthConfig,
    JwtAuthConfig,
    MtlsAuthConfig,
    RateLimitConfig,
    SecurityConfig,
    WebhookAuthConfig,
)
from mediator.stages.content_config import ValidationConfig
from mediator.stages.content_schema import CompiledSchema, SchemaStage
from mediator.stages.enrich import Enrich, EnrichConfig
from mediator.stages.enrich import build as build_enrichers
from mediator.stages.ratelimit import RateLimit
from mediator.stages.transform import build as build_ingress_transform
from mediator.stages.webhooks import WebhookAuthenticator
from mediator.stages.wellformed import WellFormed

__all__ = ["Stages", "broad_rules", "build", "problems"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Stages:
    authenticate: Authenticate
    stages: tuple[Stage, ...]
    credential_headers: frozenset[str]
    admin_roles: frozenset[str]
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    enrichers: tuple[Enrich, ...] = ()  # their connection pools are closed with the stages

    def start(self) -> None:
        """Fetch every JWKS in the background, so the first token does not wait for it."""
        for auth in self.authenticate.authenticators():
            if isinstance(auth, JwtAuthenticator) and auth.jwks is not None:
                task = asyncio.get_running_loop().create_task(auth.jwks.prefetch(), name=f"jwks:{auth.name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def reload(self) -> None:
        """SIGHUP: read the API key files again, in a thread."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.authenticate.reload_keys), name="auth:reload-keys"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.authenticate.close()
        for enricher in self.enrichers:
            await enricher.close()


def _listener_of(icfg: InboundConfigBase, listeners: Mapping[str, object]) -> tuple[str, ListenerConfigBase] | None:
    ref = icfg.connection()
    lcfg = listeners.get(ref) if ref is not None else None
    return (ref, lcfg) if ref is not None and isinstance(lcfg, ListenerConfigBase) else None


def _effective(icfg: InboundConfigBase, listener: ListenerConfigBase | None) -> tuple[list[str], bool]:
    names = icfg.auth if icfg.auth is not None else (listener.auth if listener is not None else [])
    if icfg.allow_anonymous is not None:
        anonymous = icfg.allow_anonymous
    else:
        anonymous = listener.allow_anonymous if listener is not None else False
    return list(names), anonymous


def problems(
    adapters: Mapping[str, AdapterConfig],
    auth: Mapping[str, AuthenticatorConfig],
    rules: list[AuthorizationRuleConfig],
    limits: list[RateLimitConfig],
) -> list[str]:
    out: list[str] = []
    listeners = {n: m for a in adapters.values() for n, m in a.listeners.items()}
    brokers = {n for a in adapters.values() for n in a.brokers}
    inbound_names = {n for a in adapters.values() for n in a.inbounds}
    for name, lcfg in listeners.items():
        if not isinstance(lcfg, ListenerConfigBase):
            continue
        for i, ref in enumerate(lcfg.auth):
            acfg = auth.get(ref)
            if acfg is None:
                out.append(f"listeners.{name}.auth[{i}]: no authenticator [auth.{ref}]")
            elif isinstance(acfg, BrokerAuthConfig):
                out.append(f"listeners.{name}.auth[{i}]: [auth.{ref}] is for broker inbounds")
            elif isinstance(acfg, MtlsAuthConfig) and (lcfg.tls is None or lcfg.tls.client_cert == "none"):
                out.append(f"listeners.{name}.auth[{i}]: mtls needs tls.client_cert = 'optional' or 'required'")
            elif isinstance(acfg, WebhookAuthConfig):
                # A listener's list also guards its admin endpoints, which sign nothing.
                out.append(
                    f"listeners.{name}.auth[{i}]: [auth.{ref}] (kind = 'webhook') verifies request bodies: "
                    "name it in the auth of each HTTP inbound it guards"
                )
    for adapter in adapters.values():
        for name, icfg in adapter.inbounds.items():
            found = _listener_of(icfg, listeners)
            listener = found[1] if found else None
            on_broker = icfg.connection() in brokers
            names, anonymous = _effective(icfg, listener)
            where = f"inbound.{name}.auth" if icfg.auth is not None else f"listeners.{found[0]}.auth" if found else ""
            for i, ref in enumerate(names):
                acfg = auth.get(ref)
                if acfg is None:
                    out.append(f"{where}[{i}]: no authenticator [auth.{ref}]")
                elif on_broker and not isinstance(acfg, BrokerAuthConfig):
                    out.append(
                        f"{where}[{i}]: inbound {name!r} reads from a broker, which authenticates its publishers: "
                        f"use a kind = 'broker' authenticator, not {acfg.kind!r}"
                    )
                elif not on_broker and isinstance(acfg, BrokerAuthConfig):
                    out.append(f"{where}[{i}]: [auth.{ref}] (kind = 'broker') is for broker inbounds")
                elif isinstance(acfg, MtlsAuthConfig) and (
                    listener is None or listener.tls is None or listener.tls.client_cert == "none"
                ):
                    out.append(f"{where}[{i}]: mtls needs the listener's tls.client_cert = 'optional' or 'required'")
                elif isinstance(acfg, WebhookAuthConfig) and getattr(icfg, "kind", None) != "http":
                    out.append(f"{where}[{i}]: [auth.{ref}] (kind = 'webhook') verifies signed HTTP requests only")
            if listener is not None and not listener.loopback and not names and not anonymous:
                assert found is not None
                out.append(
                    f"inbound.{name}: listener {found[0]!r} listens on {listener.host} (not loopback) and nothing "
                    "authenticates its callers: name authenticators (auth = [...]) or say allow_anonymous = true"
                )
    for i, rule in enumerate(rules):
        for ref in rule.inbounds:
            if ref not in inbound_names:
                out.append(f"authorization[{i}].inbounds: no inbound named {ref!r}")
    for i, limit in enumerate(limits):
        for ref in limit.inbounds:
            if ref not in inbound_names:
                out.append(f"rate_limits[{i}].inbounds: no inbound named {ref!r}")
    names = [r.name for r in rules]
    out += [f"authorization: rule name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    return out


def broad_rules(adapters: Mapping[str, AdapterConfig], rules: Sequence[AuthorizationRuleConfig]) -> list[str]:
    """Warnings (for ``mediator check``) about ``allow`` rules that match every authenticated principal on an
    inbound that authenticates its callers: no ``principals`` (or only ``*``) and no ``roles``. Empty lists
    match everything, so ``inbounds = [...]`` with ``anonymous = true``, written to let anonymous callers
    through, also lets every principal any authenticator vouches for publish there. Where an inbound has no
    authenticators every caller is anonymous and such a rule is exact: no warning."""
    listeners = {n: m for a in adapters.values() for n, m in a.listeners.items()}
    authenticating: dict[str, list[str]] = {}  # inbound -> its authenticators
    for adapter in adapters.values():
        for name, icfg in adapter.inbounds.items():
            found = _listener_of(icfg, listeners)
            names, _ = _effective(icfg, found[1] if found else None)
            if names:
                authenticating[name] = names
    out: list[str] = []
    for i, rule in enumerate(rules):
        if rule.effect != "allow" or rule.roles or any(p != "*" for p in rule.principals):
            continue
        scope = [n for n in (rule.inbounds or sorted(authenticating)) if n in authenticating]
        if not scope:
            continue
        who = "every authenticated principal" + (" and anonymous callers" if rule.anonymous else "")
        what = "any event type" if not rule.types else "types " + ", ".join(repr(t) for t in rule.types)
        where = ", ".join(f"{n!r} (auth {', '.join(authenticating[n])})" for n in scope)
        empty = "principals = ['*']" if rule.principals else "principals and roles are empty"
        out.append(
            f"authorization[{i}] ({rule.name!r}): allows {who} to publish {what} through inbound(s) {where}: "
            f"{empty}, and an empty list matches every principal"
            + (
                " (anonymous = true adds anonymous callers; it does not limit the rule to them)"
                if rule.anonymous
                else ""
            )
            + "; narrow it with roles = [...] or principals = [...] naming who may publish there"
        )
    return out


def build(
    adapters: Mapping[str, AdapterConfig],
    auth: Mapping[str, AuthenticatorConfig],
    rules: list[AuthorizationRuleConfig],
    limits: list[RateLimitConfig],
    security: SecurityConfig,
    base_dir: Path,
    enrich: list[EnrichConfig] | None = None,
    validation: ValidationConfig | None = None,
    schemas: Sequence[CompiledSchema] = (),
    keyrings: Mapping[str, KeyRing] | None = None,
) -> Stages:
    """The stages for a config that ``problems`` found nothing wrong with. Reads API key files and HS
    secrets (small, once, before the daemon serves); raises ConfigError when one is missing or bad."""
    made: dict[str, Authenticator] = {}
    for name, acfg in auth.items():
        if isinstance(acfg, ApiKeyAuthConfig):
            key_auth = ApiKeyAuthenticator(name, acfg, base_dir)
            key_auth.load_sync()
            made[name] = key_auth
        elif isinstance(acfg, JwtAuthConfig):
            jwt_auth = JwtAuthenticator(name, acfg, base_dir)
            jwt_auth.load_sync()
            made[name] = jwt_auth
        elif isinstance(acfg, MtlsAuthConfig):
            made[name] = MtlsAuthenticator(name, acfg)
        elif isinstance(acfg, WebhookAuthConfig):
            hook = WebhookAuthenticator(name, acfg)
            hook.load_sync()
            made[name] = hook
        else:
            made[name] = BrokerAuthenticator(name, acfg)
    listeners = {n: m for a in adapters.values() for n, m in a.listeners.items()}
    policies: dict[str, Policy] = {}
    for name, lcfg in listeners.items():
        if isinstance(lcfg, ListenerConfigBase) and lcfg.auth:
            policies[f"listener:{name}"] = Policy(tuple(made[r] for r in lcfg.auth), allow_anonymous=True)
    for adapter in adapters.values():
        for name, icfg in adapter.inbounds.items():
            found = _listener_of(icfg, listeners)
            names, anonymous = _effective(icfg, found[1] if found else None)
            if names:
                policies[name] = Policy(tuple(made[r] for r in names), allow_anonymous=anonymous)
    headers = {"authorization"} | {a.header for a in made.values() if isinstance(a, ApiKeyAuthenticator)}
    headers |= {h for a in made.values() if isinstance(a, WebhookAuthenticator) for h in a.headers}
    authenticate = Authenticate(policies, security.reserved_attributes)
    stages: list[Stage] = [authenticate]
    authorize = Authorize(rules)
    if authorize.enabled:
        stages.append(authorize)
    rate_limit = RateLimit(limits)
    if rate_limit.enabled:
        stages.append(rate_limit)
    # Content after the callers are known and within their limits: no parse for a refused caller.
    if validation is None or validation.enabled:
        stages.append(WellFormed(validation or ValidationConfig()))
    ingress_transform = build_ingress_transform(adapters, keyrings)
    schema_stage = SchemaStage(tuple(schemas), sealed=ingress_transform.encrypting())
    if schema_stage.enabled:
        stages.append(schema_stage)
    enrichers = build_enrichers(enrich or [])  # after the limits: no lookup for a caller refused anyway
    stages += enrichers
    if ingress_transform.enabled:  # last: it reshapes what the checks passed
        stages.append(ingress_transform)
    return Stages(
        authenticate, tuple(stages), frozenset(headers), frozenset(security.admin_roles), enrichers=tuple(enrichers)
    )
