"""Traces from tick to signal: W3C trace context in Kafka headers, OTLP export per process.

A sampled tick carries a `traceparent` header (W3C Trace Context); the worker, the
archiver and the monitor continue its trace, and every signal of a sampled tick
carries a `traceparent` of its own in the same trace. A process traces only when
its entry point called `configure_tracing` (deploy/ decides from the standard
OTEL_* variables); everywhere else `Tracing` is None and costs one branch.

Attribute names follow OpenTelemetry's messaging semantic conventions.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanContext, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACEPARENT_KEY = TRACEPARENT.encode()
_PROPAGATOR = TraceContextTextMapPropagator()

# messaging semantic conventions
MESSAGING_SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
BATCH_COUNT = "messaging.batch.message_count"
CONSUMER_GROUP = "messaging.consumer.group.name"
PARTITION = "messaging.destination.partition.id"
OFFSET = "messaging.kafka.offset"


@dataclass(frozen=True, slots=True)
class Tracing:
    """Where a process's spans go, and how often the feed traces a tick.

    Attributes:
        tracer: Makes the spans (its provider exports them).
        sample_rate: Fraction of ticks the feed sends with a `traceparent`; the
            other processes trace whatever arrives with one.
        max_per_second: At most this many traced ticks a second from one feed
            (`TraceBudget`); 0: no cap.
    """

    tracer: Tracer
    sample_rate: float = 0.001
    max_per_second: float = 2.0


class TraceBudget:
    """At most `per_second` traced ticks a second: a token bucket of one second's worth.

    A fixed fraction alone makes tracing's cost grow with the tick rate: each traced
    tick costs the worker a micro-batch's five spans and their export, a few hundred
    microseconds of CPU. The cap bounds that cost at any rate, while a quiet market
    still gets `sample_rate` of its ticks traced. Time comes from the caller (seconds
    on any monotonic clock), so a load generator can spend it on a schedule.

    >>> budget = TraceBudget(2.0)
    >>> [budget.take(0.0) for _ in range(3)], budget.take(0.5), budget.take(0.6)
    ([True, True, False], True, False)
    >>> all(TraceBudget(0.0).take(0.0) for _ in range(1000))
    True
    """

    def __init__(self, per_second: float):
        """`per_second` 0: every call takes (no cap)."""
        self.per_second = per_second
        self.capacity = max(per_second, 1.0)  # a burst of one second's worth (at least 1)
        self.tokens = self.capacity
        self.last: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token at time `now` (seconds); False when the bucket is empty."""
        if self.per_second <= 0:
            return True
        if self.last is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.per_second)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def messaging(topic: str, operation: str, kind: str, count: int = 0) -> dict[str, Any]:
    """Messaging attributes of a span on `topic` (`count` > 0: a batch of that many).

    >>> messaging("ticks", "send", "send")["messaging.destination.name"]
    'ticks'
    """
    attributes: dict[str, Any] = {
        MESSAGING_SYSTEM: "kafka",
        DESTINATION: topic,
        OPERATION_NAME: operation,
        OPERATION_TYPE: kind,
    }
    if count:
        attributes[BATCH_COUNT] = count
    return attributes


def header_value(context: SpanContext) -> bytes:
    """The W3C `traceparent` value naming the span of `context` (version 00).

    Written directly: the propagator's `inject` builds a context and a carrier per
    call, which a traced micro-batch would pay for each traced signal.

    >>> from opentelemetry.trace import TraceFlags
    >>> header_value(SpanContext(0xAF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, False,
    ...     TraceFlags(1)))
    b'00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    """
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}".encode()


def traceparent(span: Span) -> bytes:
    """The `traceparent` header value that makes `span` the parent of what reads it."""
    return header_value(span.get_span_context())


def parse_traceparent(value: bytes) -> Context | None:
    """The context a `traceparent` header value carries; None if it is not a valid one.

    >>> ctx = parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    >>> format(trace.get_current_span(ctx).get_span_context().trace_id, "032x")
    '0af7651916cd43dd8448eb211c80319c'
    >>> parse_traceparent(b"nonsense") is None
    True
    """
    context = _PROPAGATOR.extract({TRACEPARENT: value.decode("ascii", "replace")})
    return context if span_context(context).is_valid else None


def span_context(context: Context) -> SpanContext:
    """The remote span a context from `parse_traceparent` points to."""
    return trace.get_current_span(context).get_span_context()


def extract_context(
    headers: Iterable[tuple[Any, Any]] | Mapping[Any, Any] | None,
) -> Context | None:
    """The trace context a Kafka record's headers carry, None if none (or not a valid one).

    For consumers of ticks or signals (the archiver, the faust monitor): pass the
    record's headers as aiokafka or faust give them, pairs or a mapping, keys as
    str or bytes; start spans with `context=` the result.

    >>> extract_context([("t", b"x"), ("traceparent",
    ...     b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]) is not None
    True
    >>> extract_context({"t": b"x"}) is None
    True
    """
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        if key in (TRACEPARENT, TRACEPARENT_KEY) and value:
            return parse_traceparent(value if isinstance(value, bytes) else str(value).encode())
    return None


def consumer_spans(
    tracing: Tracing, records: Iterable[Any], topic: str, group_id: str, start_ns: int
) -> list[Span]:
    """A `process <topic>` span (CONSUMER) per traced record, a child of its context.

    `records` are consumer records with `headers`, `partition` and `offset` (as
    aiokafka gives them); records without a `traceparent` get none. End the spans
    once the records are processed.
    """
    spans = []
    for record in records:
        context = extract_context(record.headers) if record.headers else None
        if context is None:
            continue
        attributes = messaging(topic, "process", "process")
        attributes.update(
            {CONSUMER_GROUP: group_id, PARTITION: str(record.partition), OFFSET: record.offset}
        )
        spans.append(
            tracing.tracer.start_span(
                f"process {topic}",
                context=context,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                start_time=start_ns,
            )
        )
    return spans


def tracing_provider(service_name: str) -> TracerProvider:
    """A provider exporting over OTLP/HTTP as the OTEL_* variables say (not made global).

    Resource `service.name` (merged with OTEL_RESOURCE_ATTRIBUTES), a batching
    processor, and the OTLP/HTTP exporter, which reads its endpoint, headers and
    timeouts from the standard OTEL_EXPORTER_OTLP_* variables itself.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def configure_tracing(service_name: str, sample_rate: float, max_per_second: float) -> Tracing:
    """Export this process's spans over OTLP/HTTP (`tracing_provider`), as the global provider.

    Spans still queued are flushed when the process exits. Call once, at the process edge.
    """
    provider = tracing_provider(service_name)
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    return Tracing(provider.get_tracer("tickserve"), sample_rate, max_per_second)
