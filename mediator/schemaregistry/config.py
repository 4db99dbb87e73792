"""``[registry]``: the schema registry the daemon serves (Confluent Schema Registry REST API)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mediator.core.seams import ConfigModel
from mediator.schemaregistry.compat import Level


class RegistryConfig(ConfigModel):
    """A schema registry served on ``listener`` (an HTTP ``[listeners.NAME]`` section; its ``auth``
    guards it), its schemas kept in SQLite beside the outbox or in PostgreSQL (where several daemons
    share one registry)."""

    enabled: bool = False
    listener: str = Field(default="registry", min_length=1, description="the HTTP listener that serves the API")
    backend: Literal["sqlite", "postgresql"] = Field(
        default="sqlite", description="sqlite: a file beside the outbox; postgresql: shared by several daemons"
    )
    path: str | None = Field(
        default=None,
        description="sqlite: the file (relative to the working directory); default: registry.sqlite beside the "
        "outbox (in memory with a memory outbox)",
    )
    dsn_env: str | None = Field(
        default=None, description="postgresql: the environment variable holding the DSN (postgresql://...)"
    )
    compatibility: Level = Field(
        default=Level.BACKWARD, description="the global compatibility level until PUT /config changes it"
    )
    read_roles: list[str] = Field(
        default_factory=list,
        description="on a listener with auth: the roles that may read (empty: any authenticated caller)",
    )
    write_roles: list[str] = Field(
        default_factory=lambda: ["admin"],
        description="on a listener with auth: the roles that may register, delete and configure; without auth, "
        "only loopback callers may",
    )
    url: str | None = Field(
        default=None,
        description="the registry's base URL in events' dataschema (default: the listener's http(s)://host:port)",
    )
    latest_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a route's 'latest' is trusted before it is looked up again (a version registered "
        "through this daemon takes effect at once; through another daemon sharing PostgreSQL, within this)",
    )

    @model_validator(mode="after")
    def _backend(self) -> RegistryConfig:
        if self.backend == "postgresql" and not self.dsn_env:
            raise ValueError("backend = 'postgresql' needs dsn_env (the variable that holds the DSN)")
        if self.backend == "sqlite" and self.dsn_env:
            raise ValueError("dsn_env is for backend = 'postgresql'")
        return self
