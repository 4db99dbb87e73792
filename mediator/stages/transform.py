"""The ingress transform: an inbound's ``transform`` applied before routing and commit, so every route
and destination sees the result (``[inbound.NAME] transform = { ... }``; see ``mediator.core.transform``).

A transform that fails refuses the event (400 / INVALID_ARGUMENT; a broker inbound dead-letters it):
what the sender sent cannot be made into what this inbound promises its consumers.
"""

from __future__ import annotations

from collections.abc import Mapping

from mediator.core.errors import RejectCode, Rejected
from mediator.core.ingress import Batch
from mediator.core.jwe import KeyRing
from mediator.core.seams import AdapterConfig
from mediator.core.transform import Transform, TransformError


class IngressTransform:
    name = "transform"

    def __init__(self, transforms: Mapping[str, Transform]) -> None:
        self._by_inbound = dict(transforms)

    @property
    def enabled(self) -> bool:
        return bool(self._by_inbound)

    def encrypting(self) -> dict[str, Transform]:
        """The inbounds whose transform encrypts fields, with it."""
        return {name: t for name, t in self._by_inbound.items() if t.config.encrypt}

    async def run(self, batch: Batch) -> None:
        by_inbound = self._by_inbound
        events = batch.events
        for i, env in enumerate(events):
            transform = by_inbound.get(env.provenance.inbound)
            if transform is None:
                continue
            try:
                out = transform.apply(env, batch.data.get)
            except TransformError as exc:
                raise Rejected(
                    RejectCode.INVALID, f"transform failed: {exc}", rule=f"inbound.{env.provenance.inbound}.transform"
                ) from None
            if out is not env:
                batch.data.forget(env)
                events[i] = out


def build(adapters: Mapping[str, AdapterConfig], keyrings: Mapping[str, KeyRing] | None = None) -> IngressTransform:
    return IngressTransform(
        {
            name: Transform(icfg.transform, keyrings)
            for adapter in adapters.values()
            for name, icfg in adapter.inbounds.items()
            if icfg.transform is not None
        }
    )
