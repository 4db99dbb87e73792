"""``[tracing]``: OpenTelemetry spans exported over OTLP (``mediator.observability.tracing``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator

from mediator.core.seams import ConfigModel


class TracingConfig(ConfigModel):
    """Off by default, and then free: no span, no context, no exporter thread. On, every inbound message
    gets a receive span (SERVER for an HTTP or gRPC call, CONSUMER for a broker delivery) and every delivery
    attempt a send span (PRODUCER), whose context each outbound writes into its carrier. Spans leave the
    hot path through a batch processor (a thread) and are flushed within the drain on shutdown."""

    enabled: bool = Field(default=False, description="make spans and export them")
    endpoint: str = Field(
        default="http://127.0.0.1:4318/v1/traces", min_length=1, description="the OTLP/HTTP traces URL of a collector"
    )
    protocol: Literal["http/protobuf"] = Field(default="http/protobuf", description="OTLP over HTTP, protobuf body")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="request headers for the collector, each naming the environment variable holding its value",
    )
    service_name: str = Field(default="mediator", min_length=1, description="the service.name resource attribute")
    sample_ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="parent-based: a caller's sampled flag decides; a trace started here is sampled at this ratio",
    )
    export_timeout_s: float = Field(default=10.0, gt=0, description="one export request at most")
    schedule_delay_s: float = Field(default=2.0, gt=0, description="spans are sent at least this often")
    max_queue_size: int = Field(
        default=8192, ge=1, description="spans waiting for export; beyond it new ones are dropped"
    )
    max_export_batch: int = Field(default=512, ge=1, description="spans in one export request at most")

    @field_validator("headers")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for header, variable in value.items():
            if not header or not variable:
                raise ValueError('each header names an environment variable: {authorization = "OTLP_TOKEN"}')
        return value

    def resolved_headers(self, environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
        """(header -> value, problems): a problem per variable that is not set."""
        env = os.environ if environ is None else environ
        out: dict[str, str] = {}
        problems: list[str] = []
        for header, variable in self.headers.items():
            value = env.get(variable)
            if value is None:
                problems.append(f"tracing.headers.{header}: environment variable {variable} is not set")
            else:
                out[header] = value
        return out, problems
