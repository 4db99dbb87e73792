"""``[metrics]``: where the Prometheus metrics are served (``mediator.observability.metrics``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from mediator.core.seams import ConfigModel


class MetricsConfig(ConfigModel):
    """Prometheus metrics in the text exposition format, served by HTTP listeners at ``path``.

    On a listener with ``auth``, the metrics follow the admin rule (the admin token, or a principal with
    an admin role) unless ``public``; on one without, they are open like ``/readyz``.
    """

    enabled: bool = Field(
        default=True,
        description="count and serve the metrics; off, nothing is counted (about 1-2% of the CPU an event costs) "
        "and /admin/status shows no counters",
    )
    path: str = Field(default="/metrics", description="where the listeners serve them")
    listener: str | None = Field(
        default=None,
        description="the HTTP listener that serves them (e.g. one of their own on another port, with no "
        "inbounds); None: every HTTP listener",
    )
    public: bool = Field(default=False, description="serve them without credentials on listeners with auth")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "{" in value or any(c.isspace() for c in value):
            raise ValueError(f"an absolute path without variables or spaces, such as '/metrics', got {value!r}")
        return value
