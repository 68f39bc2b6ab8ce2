"""Whether a process traces: the standard OTEL_* variables, read here at the process edge."""

from __future__ import annotations

import os
from collections.abc import Mapping

from deploy.settings import Settings
from tickserve.tracing import Tracing, configure_tracing

# any of these names an OTLP endpoint (the exporter reads them itself)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces over OTLP.

    An endpoint is set, or OTEL_TRACES_EXPORTER=otlp (the default endpoint,
    localhost:4318); OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off.

    >>> tracing_requested({}), tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    (False, True)
    >>> tracing_requested({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})
    False
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return exporter == "otlp" or any(environ.get(name) for name in ENDPOINT_VARIABLES)


def start_tracing(service_name: str, settings: Settings) -> Tracing | None:
    """Export this process's spans if the environment asks for it; None: tracing is off."""
    if not tracing_requested(os.environ):
        return None
    return configure_tracing(
        service_name, settings.trace_sample_rate, settings.trace_max_per_second
    )
