"""The composition root's list of protocols: the ONLY place that names adapter packages.

Adding a protocol = one package under ``adapters/`` exporting ``ADAPTER`` plus one line here. A package
whose sections come in two kinds (``adapters.push``: ``kind = "push"`` outbounds and ``kind = "websocket"``
inbounds) exports ``ADAPTERS``, a tuple of specs, instead.
"""

from __future__ import annotations

import importlib

from mediator.core.seams import AdapterSpec

ADAPTER_PACKAGES = (
    "adapters.http",
    "adapters.grpc",
    "adapters.mqtt",
    "adapters.amqp",
    "adapters.nats",
    "adapters.push",
)


def load_specs() -> dict[str, AdapterSpec]:
    specs: dict[str, AdapterSpec] = {}
    for package in ADAPTER_PACKAGES:
        module = importlib.import_module(package)
        for spec in getattr(module, "ADAPTERS", None) or (module.ADAPTER,):
            assert isinstance(spec, AdapterSpec), package
            specs[spec.kind] = spec
    return specs
