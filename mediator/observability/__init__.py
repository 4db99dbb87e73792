"""Observability: Prometheus metrics and OpenTelemetry tracing, observed at the seams (DESIGN.md section 5)."""
