from __future__ import annotations

from tests.e2e.conftest import daemon, quickstart

__all__ = ["daemon", "quickstart"]  # the end-to-end fixtures: the shipped config on free ports, running
