"""Prometheus (prometheus-client): the ``Telemetry`` port, its metric definitions and their docs."""

from adapters.prometheus.telemetry import PrometheusTelemetry

__all__ = ["PrometheusTelemetry"]
