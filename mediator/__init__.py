"""mediator: a multi-protocol event gateway."""

__version__ = "0.1.0"
