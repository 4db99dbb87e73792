"""The composition root's list of protocols: the ONLY place that names adapter packages.

Adding a protocol = one package under ``adapters/`` exporting ``ADAPTER`` plus one line here.
"""

from __future__ import annotations

import importlib

from mediator.core.seams import AdapterSpec

ADAPTER_PACKAGES = ("adapters.http", "adapters.grpc", "adapters.mqtt", "adapters.amqp")


def load_specs() -> dict[str, AdapterSpec]:
    specs: dict[str, AdapterSpec] = {}
    for package in ADAPTER_PACKAGES:
        spec = importlib.import_module(package).ADAPTER
        assert isinstance(spec, AdapterSpec), package
        specs[spec.kind] = spec
    return specs
