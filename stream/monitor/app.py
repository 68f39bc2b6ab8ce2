"""`tickserve monitor`: the faust app that keeps live accuracy and feature drift in tables.

Summaries (`stream.contracts.summary`) arrive one per worker offset commit; the agent
takes them in runs, `Judge` turns a run into count deltas, and the deltas go into
faust tables backed by changelog topics, so a restarted monitor resumes with the
same figures:

- `accuracy-1h` / `accuracy-24h`: hopping windows (by the summaries' record time) of
  [hits, calls] per "model|version|symbol" (`accuracy-keys` lists the keys);
- `feature-bins`: live counts per "model|version|feature" over the reference bins;
- `serving`: the version each model last served (what the gauges show).

A timer turns the tables into the gauges `model_directional_accuracy` and
`feature_psi`, and another writes them to ClickHouse (`stream.monitor.rollups`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from prometheus_client import Counter, Gauge

from stream.contracts.summary import BatchSummary
from stream.monitor.judge import Deltas, Judge
from stream.monitor.quality import psi
from stream.monitor.reference import Reference, ReferenceFollower
from stream.monitor.rollups import Rollup, RollupWriter
from tickserve.errors import DataError, ServiceError

logger = logging.getLogger(__name__)

ACCURACY = Gauge(
    "model_directional_accuracy",
    "Share of the serving version's judged calls that matched the realized direction",
    ["model", "symbol", "window"],
)
CALLS = Gauge(
    "model_directional_calls",
    "Judged calls behind model_directional_accuracy",
    ["model", "symbol", "window"],
)
PSI = Gauge(
    "feature_psi",
    "Population stability index of a feature: live rows of the serving version against "
    "its training reference",
    ["model", "feature"],
)
SUMMARIES = Counter("monitor_summaries_total", "Micro-batch summaries processed")
TICKS = Counter("monitor_ticks_total", "Ticks in the summaries processed")
BUSY = Counter("monitor_busy_seconds_total", "Time spent judging summaries and updating tables")
ROLLUPS = Counter("monitor_rollup_writes_total", "Writes of the figures to ClickHouse")
BAD = Counter("monitor_bad_summaries_total", "Records on the summary topic that did not decode")

# window label -> (size, step) in seconds: hopping windows, a figure covers the last `size`
WINDOWS = {"1h": (3600, 900), "24h": (86400, 10800)}
SEP = "|"


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """What the monitor reads, where its state lives, what it exports.

    Attributes:
        app_id: faust app id: names the consumer group and the changelog topics.
        bootstrap: Kafka bootstrap servers.
        summary_topic: Where the workers publish their micro-batch summaries.
        partitions: Partitions of the summary topic (tables are co-partitioned).
        bar_ns: Bar length of the FeatureSpec (labels are on the same bars).
        tracking_uri: MLflow, for the reference histograms.
        model_name: Registered model whose alias is followed.
        model_alias: The alias that serves the signals.
        reference_poll_s: How often the alias is looked up.
        export_interval_s: How often the tables become gauges.
        rollup_interval_s: How often the figures are written to ClickHouse.
        clickhouse_dsn: Where the rollups go ("" = nowhere).
        take: Most summaries judged in one run (one table update per key per run).
        take_within_s: How long a run waits to fill up: table updates per summary fall
            as runs grow, the figures lag by up to this much.
    """

    app_id: str
    bootstrap: str
    summary_topic: str
    partitions: int
    bar_ns: int
    tracking_uri: str
    model_name: str
    model_alias: str = "champion"
    reference_poll_s: float = 5.0
    export_interval_s: float = 1.0
    rollup_interval_s: float = 60.0
    clickhouse_dsn: str = ""
    take: int = 500
    take_within_s: float = 1.0


@dataclass(frozen=True, slots=True)
class _At:
    """An instant (s) handed to a windowed read in place of an event (see `_clock`)."""

    at: float


def _add(current: Any, delta: Any) -> list[int]:
    """Element-wise sum of two count lists (a missing value is empty).

    >>> _add([], [1, 2]), _add([1, 2], [3, 4])
    ([1, 2], [4, 6])
    """
    a, b = list(current or ()), list(delta)
    if len(a) < len(b):
        a.extend([0] * (len(b) - len(a)))
    return [x + y for x, y in zip(a, b, strict=False)]


class QualityMonitor:
    """The faust app and its parts; `deploy.cli` runs it in a faust worker."""

    def __init__(self, config: MonitorConfig) -> None:
        """Declare the app, topic, tables, agent and timers (nothing connects yet)."""
        import faust

        self.config = config
        self.judge = Judge(config.bar_ns)
        self.follower = ReferenceFollower(
            config.tracking_uri, config.model_name, config.model_alias
        )
        self.reference: Reference | None = None
        self.rollups: RollupWriter | None = None
        self._clock_s = 0.0
        self._polling = asyncio.Lock()
        app = faust.App(
            config.app_id,
            broker=f"kafka://{config.bootstrap}",
            store="memory://",
            topic_partitions=config.partitions,
            topic_replication_factor=1,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=1.0,
            # a summary is one record of many ticks' columns: fetch many at once
            consumer_max_fetch_size=16 * 1024 * 1024,
            producer_linger_ms=5,
            # one changelog record per produce batch: on restart faust reads each changelog
            # up to its highwater and drops what comes after; a broker whose ListOffsets
            # answers the last batch's first offset + 1 (the local broker, BROKER.md) would
            # cut recovery short by the rest of that batch. A few records per run, so cheap.
            producer_max_batch_size=1,
        )
        self.app = app
        self.topic = app.topic(
            config.summary_topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=config.partitions,
        )
        # windowed by `_clock` (faust's relative_to accepts a callable; its stubs omit it)
        # Tables are written once per run of summaries (not inside one event's
        # iteration): the producer's partitioner places their changelog records.
        # One monitor instance recovers every partition (summaries are keyed by the
        # workers' consumer group, so one group's land in one partition anyway).
        table = functools.partial(app.Table, partitions=config.partitions, use_partitioner=True)
        self.accuracy: dict[str, Any] = {
            label: cast(
                Any, table(f"accuracy-{label}", default=list).hopping(size, step, expires=size)
            ).relative_to(self._clock)
            for label, (size, step) in WINDOWS.items()
        }
        self.keys = table("accuracy-keys", default=int)
        self.bins = table("feature-bins", default=list)
        self.serving = table("serving", default=str)
        app.agent(self.topic, name="judge")(self._consume)
        app.timer(config.reference_poll_s)(self._poll_reference)
        app.timer(config.export_interval_s)(self._export)
        if config.clickhouse_dsn:
            app.timer(config.rollup_interval_s)(self._write_rollups)

    def _clock(self, event: Any = None) -> float:
        """Window time: an explicit instant (`_At`, for reads), else the run's record time."""
        return float(event.at) if isinstance(event, _At) else self._clock_s

    async def _consume(self, stream: Any) -> None:
        async for events in stream.take_events(self.config.take, within=self.config.take_within_s):
            if self.reference is None:
                await self._poll_reference()
            summaries = []
            for event in events:
                try:
                    summaries.append(BatchSummary.decode(event.value))
                except DataError as exc:
                    BAD.inc()
                    logger.warning("bad summary", extra={"error": str(exc)})
            if not summaries:
                continue
            started = time.perf_counter()
            self._clock_s = max(float(e.message.timestamp) for e in events)
            deltas = self.judge.add(summaries, self.reference)
            self._apply(deltas, summaries[-1])
            SUMMARIES.inc(len(summaries))
            TICKS.inc(deltas.ticks)
            BUSY.inc(time.perf_counter() - started)

    def _apply(self, deltas: Deltas, newest: BatchSummary) -> None:
        """Add a run's deltas to the tables (one update per key and window)."""
        if self.serving[newest.model] != newest.version:
            self.serving[newest.model] = newest.version
        for (model, version, symbol), counts in deltas.calls.items():
            key = SEP.join((model, version, symbol))
            for table in self.accuracy.values():
                table[key].apply(_add, counts)
            if key not in self.keys:
                self.keys[key] = 1
        ref = self.reference
        if ref is not None:
            for feature, binned in deltas.bins.items():
                key = SEP.join((ref.model, ref.version, feature))
                self.bins[key] = _add(self.bins[key], binned.tolist())

    async def _poll_reference(self) -> None:
        async with self._polling:  # the agent and the timer may both ask
            self.use(await asyncio.to_thread(self.follower.poll))

    def use(self, reference: Reference | None) -> None:
        """Compare with `reference` from now on (None: keep the current one)."""
        if reference is not None:
            self.reference = reference
            self.judge.set_horizon(reference.horizon_bars)

    def figures(self) -> list[Rollup]:
        """The serving versions' figures now: accuracy per symbol and window, PSI per feature."""
        now = time.time()
        out = []
        for key in list(self.keys.keys()):
            model, version, symbol = key.split(SEP)
            if self.serving[model] != version:
                continue
            for label, table in self.accuracy.items():
                size, step = WINDOWS[label]
                # the oldest window holding `now`: the one that covers the last `size` s
                hits, calls = (table[key].value(_At(now - size + step)) or [0, 0])[:2]
                if calls:
                    out.append(
                        Rollup("accuracy", model, version, hits / calls, calls, hits, symbol, label)
                    )
        ref = self.reference
        if ref is not None:
            for feature, reference_counts in ref.counts.items():
                live = np.asarray(self.bins[SEP.join((ref.model, ref.version, feature))], np.int64)
                if live.sum():
                    value = psi(reference_counts, live)
                    total = int(live.sum())
                    out.append(Rollup("psi", ref.model, ref.version, value, total, feature=feature))
        return out

    async def _export(self) -> None:
        for r in self.figures():
            if r.kind == "accuracy":
                ACCURACY.labels(r.model, r.symbol, r.window).set(r.value)
                CALLS.labels(r.model, r.symbol, r.window).set(r.total)
            else:
                PSI.labels(r.model, r.feature).set(r.value)

    async def _write_rollups(self) -> None:
        figures = self.figures()
        try:
            if self.rollups is None:
                self.rollups = await asyncio.to_thread(
                    RollupWriter.open, self.config.clickhouse_dsn
                )
            await asyncio.to_thread(self.rollups.write, figures)
            ROLLUPS.inc()
        except ServiceError as exc:
            logger.warning("rollups not written", extra={"error": str(exc)})


def run_monitor(monitor: QualityMonitor, http_port: int, log_level: str = "INFO") -> int:
    """Serve /metrics on `http_port`, then run the app in a faust worker until SIGTERM/SIGINT.

    The worker keeps the process's logging (JSON lines, `tickserve.logs`) instead of
    installing its own, and prints no banner.

    Returns:
        The worker's exit status.
    """
    import faust
    from prometheus_client import start_http_server

    if http_port:
        start_http_server(http_port, addr="127.0.0.1")
    # once before the worker starts: this also imports MLflow in this thread, not in two
    # threads of the running app at once
    monitor.use(monitor.follower.poll())
    worker = faust.Worker(
        monitor.app,
        loglevel=log_level,
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    logger.info(
        "monitor starting",
        extra={"topic": monitor.config.summary_topic, "app_id": monitor.config.app_id},
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
