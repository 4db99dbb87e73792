"""Protocol adapters: one package per protocol, each exporting ``ADAPTER`` (see mediator.core.seams)."""
