"""Authorization: which principals (or roles) may publish which event types through which inbounds.

No rules: everything authenticated passes. As soon as one rule exists, the default is deny: an event
passes when no ``deny`` rule matches it and an ``allow`` rule does. A refusal names the rule that refused
(or ``default-deny``) and the principal, type and inbound the sender already knows, never a route.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mediator.core.errors import RejectCode, Rejected
from mediator.core.ingress import Batch, Principal, Who
from mediator.core.patterns import compile_glob
from mediator.stages.config import AuthorizationRuleConfig

DEFAULT_DENY = "default-deny"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    allow: bool
    who: Who
    inbounds: frozenset[str]
    types: tuple[Callable[[str], bool], ...]

    @classmethod
    def compile(cls, cfg: AuthorizationRuleConfig) -> Rule:
        return cls(
            cfg.name,
            cfg.effect == "allow",
            Who.compile(cfg.principals, cfg.roles, cfg.anonymous),
            frozenset(cfg.inbounds),
            tuple(compile_glob(t) for t in cfg.types),
        )

    def matches(self, principal: Principal, inbound: str, type_: str) -> bool:
        if self.inbounds and inbound not in self.inbounds:
            return False
        if self.types and not any(m(type_) for m in self.types):
            return False
        return self.who.admits(principal)


class Authorize:
    name = "authorize"

    def __init__(self, rules: Sequence[AuthorizationRuleConfig]) -> None:
        compiled = [Rule.compile(r) for r in rules]
        self._deny = [r for r in compiled if not r.allow]
        self._allow = [r for r in compiled if r.allow]
        # (principal, inbound, type) -> the refusing rule's name or None; principals are few, types too.
        self._decisions: dict[tuple[str, frozenset[str], str, str], str | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._deny or self._allow)

    def decide(self, principal: Principal, inbound: str, type_: str) -> str | None:
        """The name of the rule that refuses, or None when allowed."""
        key = (principal.id, principal.roles, inbound, type_)
        try:
            return self._decisions[key]
        except KeyError:
            pass
        verdict: str | None = DEFAULT_DENY
        for rule in self._deny:
            if rule.matches(principal, inbound, type_):
                verdict = rule.name
                break
        else:
            if any(rule.matches(principal, inbound, type_) for rule in self._allow):
                verdict = None
        if len(self._decisions) >= 65536:
            self._decisions.clear()
        self._decisions[key] = verdict
        return verdict

    async def run(self, batch: Batch) -> None:
        inbound = batch.origin.inbound
        for env, principal in zip(batch.events, batch.principals, strict=True):
            refusing = self.decide(principal, inbound, env.type)
            if refusing is not None:
                who = f"principal {principal.id!r}" if principal.id else "an anonymous caller"
                how = "denied by rule" if refusing != DEFAULT_DENY else "no rule allows it; rule"
                raise Rejected(
                    RejectCode.FORBIDDEN,
                    f"{who} may not publish {env.type!r} through inbound {inbound!r} ({how} {refusing!r})",
                    rule=refusing,
                )
