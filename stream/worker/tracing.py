"""The worker's spans: a micro-batch holding traced ticks, and their signals' trace context.

Per micro-batch with at least one traced tick (a `traceparent` header): a
`process ticks` span (CONSUMER, linked to each traced tick's context) with children
`decode`, `features`, `score` and `send signals`, timed by the stamps the worker
takes anyway (spans are started and ended with explicit times, nothing is timed
twice).

The common case, one traced tick in the micro-batch, takes four spans and the
batch span: `process ticks` is then a child of the tick's context as well as
linked to it, so the tick's trace holds the whole batch, and the tick's signal
carries the `traceparent` of `send signals`. With two or more traced ticks,
`process ticks` starts a trace of its own, linked to each; each traced tick's
signal then gets a `create signals` span, a child of its tick's context linked to
the batch, and carries its `traceparent`.

A micro-batch without traced ticks costs one scan of the records' header counts
(`stream.kafka.recordbatch.find_header`); a worker without tracing costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

from stream.kafka.fetched import Fetched
from stream.kafka.recordbatch import find_header
from tickserve.tracing import (
    CONSUMER_GROUP,
    TRACEPARENT,
    TRACEPARENT_KEY,
    Tracing,
    header_value,
    messaging,
    parse_traceparent,
    span_context,
)

_KEY = np.frombuffer(TRACEPARENT_KEY, np.uint8)


class BatchTracing:
    """Finds the traced ticks of a micro-batch and starts its spans."""

    def __init__(self, tracing: Tracing, ticks_topic: str, signals_topic: str, group_id: str):
        """Spans go to `tracing.tracer`; the topics and group name them."""
        self.tracer = tracing.tracer
        self.ticks_topic = ticks_topic
        self.signals_topic = signals_topic
        self.group_id = group_id
        empty = np.empty(0, np.int64)  # load (or compile) the scan now, not on a live batch
        find_header(np.empty(0, np.uint8), empty, empty, _KEY)

    def find(self, fetched: Fetched, started_ns: int) -> TracedBatch | None:
        """The micro-batch's traced ticks, its spans begun at `started_ns`; None if none."""
        records, at, size = find_header(fetched.buf, fetched.value_start, fetched.value_len, _KEY)
        if not len(records):
            return None
        buf = fetched.buf
        contexts: dict[int, Context] = {}
        for record, start, length in zip(records.tolist(), at.tolist(), size.tolist(), strict=True):
            context = parse_traceparent(buf[start : start + length].tobytes())
            if context is not None:
                contexts[record] = context
        return TracedBatch(self, contexts, len(fetched), started_ns) if contexts else None


class TracedBatch:
    """One micro-batch's spans: begun when its traced ticks are found, ended by `end`."""

    def __init__(
        self, parent: BatchTracing, contexts: dict[int, Context], count: int, started_ns: int
    ):
        """Start `process ticks` at `started_ns`, linked to every traced tick (by record)."""
        self.tracing = parent
        self.contexts = contexts
        self.started_ns = started_ns
        attributes = messaging(parent.ticks_topic, "process", "process", count)
        attributes[CONSUMER_GROUP] = parent.group_id
        # one traced tick: the batch goes on in its trace (see the module's docstring)
        self.single = next(iter(contexts.values())) if len(contexts) == 1 else None
        self.span = parent.tracer.start_span(
            f"process {parent.ticks_topic}",
            context=self.single,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=[Link(span_context(c)) for c in contexts.values()],
            start_time=started_ns,
        )
        self.inside = trace.set_span_in_context(self.span)
        self.send: Span | None = None
        self.created: list[Span] = []

    def _start_send(self, start_ns: int, signals: int) -> Span:
        topic = self.tracing.signals_topic
        return self.tracing.tracer.start_span(
            f"send {topic}",
            context=self.inside,
            kind=SpanKind.PRODUCER,
            attributes=messaging(topic, "send", "send", signals),
            start_time=start_ns,
        )

    def signal_headers(
        self, records: np.ndarray, scored_ns: int
    ) -> dict[int, Sequence[tuple[str, bytes]]]:
        """Headers of the signal rows whose tick is traced: row -> its `traceparent`.

        `records` holds each signal row's record index in the micro-batch, sent from
        `scored_ns` on. With one traced tick its signal names `send signals`; with
        more, each such signal gets a `create signals` span in its tick's trace.
        """
        traced = [(int(row), record) for record in self.contexts
                  for row in np.flatnonzero(records == record)]  # fmt: skip
        if not traced:
            return {}
        if self.single is not None:
            self.send = self._start_send(scored_ns, len(records))
            value = header_value(self.send.get_span_context())
            return {row: [(TRACEPARENT, value)] for row, _ in traced}
        tracer, topic = self.tracing.tracer, self.tracing.signals_topic
        now = time.time_ns()
        batch = [Link(self.span.get_span_context())]
        headers: dict[int, Sequence[tuple[str, bytes]]] = {}
        for row, record in traced:
            span = tracer.start_span(
                f"create {topic}",
                context=self.contexts[record],
                kind=SpanKind.PRODUCER,
                attributes=messaging(topic, "create", "create"),
                links=batch,
                start_time=now,
            )
            self.created.append(span)
            headers[row] = [(TRACEPARENT, header_value(span.get_span_context()))]
        return headers

    def end(self, stamps: tuple[int, int, int], sent_ns: int, signals: int) -> None:
        """End every span: `stamps` are when the batch was decoded, featured and scored."""
        tracer = self.tracing.tracer
        decoded, featured, scored = stamps
        for name, start, end in (
            ("decode", self.started_ns, decoded),
            ("features", decoded, featured),
            ("score", featured, scored),
        ):
            tracer.start_span(name, context=self.inside, start_time=start).end(end_time=end)
        send = self.send if self.send is not None else self._start_send(scored, signals)
        for span in self.created:
            send.add_link(span.get_span_context())
            span.end(end_time=sent_ns)
        send.end(end_time=sent_ns)
        self.span.end(end_time=max(sent_ns, time.time_ns()))
