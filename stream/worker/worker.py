"""The stream worker: ticks -> features -> scores -> signals, one micro-batch at a time."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from prometheus_client import Counter

from features.engine import FeatureEngine
from features.kernels import STATUS_LATE
from features.latest import LatestRows
from features.online import OnlineWriter
from inference.batcher import MicroBatcher
from inference.registry import LoadedModel
from stream.contracts import tickcodec
from stream.contracts.signal import NON_FINITE, STAGES
from stream.contracts.tick import Rejected
from stream.contracts.tickcodec import SymbolTable, TickSpans, decode_columns
from stream.kafka import signalbatch
from stream.kafka.base import DataPlaneConfig, OpenDataPlane, SignalSink, TickSource
from stream.kafka.fetched import Fetched
from stream.kafka.signalbatch import encode_signal_batches
from stream.worker.commits import CommitTracker
from stream.worker.deadletters import DeadLetters
from stream.worker.health import ProgressWatch
from stream.worker.recovery import Recovery, SnapshotKeeper
from stream.worker.shadow import ShadowSignals
from stream.worker.summaries import SummaryPublisher
from stream.worker.telemetry import BatchTelemetry
from stream.worker.tracing import BatchTracing
from tickserve.metrics import SymbolLabels
from tickserve.tracing import Tracing

logger = logging.getLogger(__name__)

PREDICTION_ERRORS = Counter(
    "prediction_errors_total",
    "Ready rows the model gave no finite score (their signals carry the error)",
    ["model", "version", "reason"],
)

# (trade_ids, symbols, feature values, ready) of each micro-batch, for audits and tests
FeatureTap = Callable[[list[str], list[str], np.ndarray, np.ndarray], None]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Topics and knobs of one worker process; `dataplane` says where ticks come from."""

    dataplane: DataPlaneConfig
    signals_topic: str
    dlq_topic: str
    max_future_ns: int = 5_000_000_000
    threshold: float = 0.5
    snapshot_interval_s: float = 10.0
    # acknowledged offsets are committed at most this often (an OffsetCommit per
    # micro-batch is a large share of the worker's CPU); a crash replays at most this
    # much more, at-least-once either way
    commit_interval_s: float = 0.1
    shadow_topic: str = ""  # challenger scores go here (never to signals); "" = not sent
    summary_topic: str = ""  # the accepted ticks, per commit, for the monitor; "" = not sent
    # /ready says "stalled" once no position moved for this long while partitions lag
    stall_after_s: float = 30.0


class StreamWorker:
    """Wires the data plane, FeatureEngine, batcher and its parts; owns no business logic.

    Offsets are committed only after every signal and dead letter of the batch is
    acknowledged by the broker (`CommitTracker`: at-least-once, a crash replays,
    never skips). Feature state survives restarts and rebalances (`Recovery`).
    """

    source: TickSource
    sink: SignalSink
    commits: CommitTracker
    dead_letters: DeadLetters
    shadow: ShadowSignals | None
    summaries: SummaryPublisher | None

    def __init__(
        self,
        config: WorkerConfig,
        engine: FeatureEngine,
        batcher: MicroBatcher,
        open_dataplane: OpenDataPlane,
        writer: OnlineWriter | None = None,
        snapshots: SnapshotKeeper | None = None,
        feature_tap: FeatureTap | None = None,
        tracing: Tracing | None = None,
        symbols: SymbolLabels | None = None,
    ):
        """Hold the parts; `run` opens the data plane (`open_dataplane`) and connects.

        With `tracing`, micro-batches holding traced ticks get spans (`stream.worker.tracing`).
        `symbols` bounds the `symbol` label of predictions_total (default: the first
        20 symbols seen).
        """
        self.config = config
        self.engine = engine
        self.batcher = batcher
        self.open_dataplane = open_dataplane
        self.writer = writer
        self.feature_tap = feature_tap
        self.recovery = Recovery(engine, snapshots, config.snapshot_interval_s)
        self.latest_rows = LatestRows(engine, writer)
        self.assigned = asyncio.Event()
        self.processed = 0
        self._batch_lock = asyncio.Lock()
        self._signal_partitions = 0
        self._symbol_table = SymbolTable()
        self.telemetry = BatchTelemetry(symbols)
        self.progress = ProgressWatch(config.stall_after_s)
        plane = config.dataplane
        self.tracing = (
            None
            if tracing is None
            else BatchTracing(tracing, plane.topic, config.signals_topic, plane.group_id)
        )

    @property
    def model(self) -> LoadedModel:
        """The champion serving now (a swap lands between two micro-batches)."""
        return self.batcher.model

    def not_ready_reason(self) -> str | None:
        """Why signals are held back now (`/ready` says it), or None.

        Replaying after a restore (rebuilding, where positions were stale), or stalled:
        no position moved for `stall_after_s` while partitions lag.
        """
        replaying = self.recovery.replay_until
        if not replaying:
            return self.progress.reason()
        parts = ", ".join(str(tp.partition) for tp in sorted(replaying))
        rebuilt = "; ".join(self.recovery.rebuilt.values())
        why = f"replaying partitions {parts} up to their committed offsets"
        return f"{why} ({rebuilt})" if rebuilt else why

    def latest(self, symbol: str) -> tuple[int, np.ndarray] | None:
        """The newest ready feature row of `symbol` and its event time, None if none yet."""
        return self.latest_rows.latest(symbol)

    def _connect(self) -> None:
        """Open the data plane and the parts that send or commit through it."""
        cfg = self.config
        plane = self.open_dataplane(cfg.dataplane)
        self.source, self.sink = plane.source, plane.sink
        self.summaries = None
        if cfg.summary_topic:
            key = cfg.dataplane.group_id.encode()
            self.summaries = SummaryPublisher(
                self.sink, cfg.summary_topic, key, cfg.threshold, self.engine.symbols
            )
        self.commits = CommitTracker(
            self.source,
            cfg.commit_interval_s,
            transactional=plane.transactional,
            before_commit=None if self.summaries is None else self.summaries.flush,
        )
        self.dead_letters = DeadLetters(self.sink, cfg.dlq_topic)
        self.shadow = (
            ShadowSignals(self.sink, cfg.shadow_topic, cfg.threshold) if cfg.shadow_topic else None
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then commit, snapshot and close."""
        for codec in (tickcodec, signalbatch):
            # load (or compile, with a cold Numba cache) before joining the group, not
            # on the first micro-batch while ticks pile up
            codec.warm_up()
        self._connect()
        source, sink = self.source, self.sink
        await sink.start()
        try:
            # the group join (and its assignment callback) may run inside `start`
            await source.start(self)
        except Exception:
            await sink.close()
            raise
        clean = False
        try:
            self._signal_partitions = await sink.partitions(self.config.signals_topic)
            await source.wait_assigned()
            self.assigned.set()
            logger.info(
                "worker consuming",
                extra={
                    "topic": self.config.dataplane.topic,
                    "model": self.model.name,
                    "version": self.model.version,
                },
            )
            probe = asyncio.create_task(self._probe_lag(stop))
            try:
                await self._loop(stop)
            finally:
                probe.cancel()
            clean = True
        finally:
            try:
                if clean:
                    async with self._batch_lock:
                        await self.commits.reap(block=True)
                        if await self.commits.commit():
                            await self.recovery.write(self.recovery.take())
            finally:
                try:
                    await source.close()
                finally:
                    await sink.close()
            if self.writer is not None:
                self.latest_rows.offer(force=True)
                self.writer.close()
            self.recovery.close()
            self.telemetry.close()
            logger.info("worker stopped", extra={"processed": self.processed})

    async def _loop(self, stop: asyncio.Event) -> None:
        source, commits = self.source, self.commits
        while not stop.is_set():
            fetched = await source.poll(100)
            positions = self.recovery.positions
            lag = self.telemetry.fetched(fetched, positions)
            self.progress.observe({**positions, **fetched.next_offsets}, lag)
            if len(fetched):
                async with self._batch_lock:
                    await self._handle(fetched)
            elif fetched.next_offsets:  # only skipped offsets: move the state's position
                self.recovery.applied(fetched.next_offsets)
            await commits.reap(block=False)
            if not len(fetched):
                self.latest_rows.offer(force=False)  # a quiet stream still reaches the store
            if commits.idle_with_acks and commits.due():
                await commits.commit()  # a quiet stream still commits what was acked

    async def _probe_lag(self, stop: asyncio.Event) -> None:
        """Ask the broker for the log ends while nothing advances, so lag stays true.

        Fetches that bring nothing (a stuck connection, a broker answering empty, a
        loop stuck on acks) carry no high watermarks: without this, a stall would
        show the last lag seen, often 0.
        """
        every_s = min(self.progress.stall_after_s / 2, 5.0)
        warned = False
        while not stop.is_set():
            await asyncio.sleep(every_s)
            if self.progress.quiet_s() < every_s:
                continue
            positions = self.progress.positions()
            try:
                ends = {tp: (await self.source.log_range(tp))[1] for tp in positions}
            except Exception as exc:  # the broker may be away: keep the lag last known
                if not warned:
                    logger.warning("lag probe failed", extra={"error": repr(exc)})
                warned = True
                continue
            warned = False
            lag = {tp: max(end - positions[tp], 0) for tp, end in ends.items()}
            self.telemetry.lagged(lag)
            self.progress.observe(positions, lag)

    async def _handle(self, fetched: Fetched) -> None:
        """Process a micro-batch; its acks and commit complete in the background, in order."""
        recovery = self.recovery
        recovery.check_gaps(fetched)
        acks = await self.process(fetched)
        offsets = dict(fetched.next_offsets)
        recovery.applied(offsets)
        after_commit = None
        if recovery.due():
            snaps = recovery.take()  # the state now, written once it is committed
            if snaps:
                after_commit = functools.partial(recovery.write, snaps)
        self.commits.track(acks, offsets, after_commit)
        self.telemetry.progressed()
        if self.commits.full:
            await self.commits.wait_room()
        await self.commits.between_batches()

    async def process(self, fetched: Fetched) -> list[asyncio.Future[Any]]:
        """Score one micro-batch and hand its signals and dead letters to the sink.

        Columns all the way: record values are decoded from the fetch buffer in bulk,
        symbols map to feature slots through a hash table, and the signals are
        written into Kafka record batches by one Numba pass (`stream.kafka.signalbatch`).
        Python runs per record only for dead letters, new symbols and shadow scores.

        Returns the futures of their acknowledgements.
        """
        started_ns = time.time_ns()
        cfg = self.config
        traced = self.tracing.find(fetched, started_ns) if self.tracing is not None else None
        spans, rejected = decode_columns(
            fetched.buf, fetched.value_start, fetched.value_len, started_ns, cfg.max_future_ns
        )
        t_decoded = time.time_ns()
        slots = self._slots(spans, fetched)
        if self.engine.full:
            spans, slots = self._over_capacity(spans, slots, rejected)
        feats = self.engine.update(slots, spans.event_ns, spans.price, spans.quantity, spans.is_buy)
        t_featured = time.time_ns()
        if self.feature_tap is not None:
            self.feature_tap(spans.trade_ids(), spans.symbols(), feats.values, feats.ready)
        ready = feats.ready
        # one batcher call per micro-batch: every row of it is scored by the same version
        scored = self.batcher.score_batch(feats.values[ready], spans.recv_ns[ready])
        scores = np.full(len(spans), np.nan)
        scores[ready] = scored.scores
        stale = np.zeros(len(spans), np.bool_)
        stale[ready] = scored.stale
        t_scored = time.time_ns()

        model = scored.model
        replayed = self.recovery.replayed(fetched)  # per record: already has its signal
        late = feats.status == STATUS_LATE
        keep = ~late & ~stale
        if replayed is not None:
            keep &= ~replayed[spans.index]
        rows = np.flatnonzero(keep)
        acks: list[asyncio.Future[Any]] = []
        if rows.size:
            batches = self._signal_batches(
                spans,
                rows,
                fetched,
                ready[rows],
                scores[rows],
                model,
                started_ns,
                (t_decoded, t_featured, t_scored),
                traced.signal_headers(spans.index[rows], t_scored) if traced is not None else None,
            )
            acks = await self.sink.send(cfg.signals_topic, batches)
        t_produced = time.time_ns()  # the signals' Produce is queued (acks come later)
        if traced is not None:
            traced.end((t_decoded, t_featured, t_scored), t_produced, int(rows.size))
        dead_letters = self.dead_letters
        for record, reason, detail in dead_letters.select(
            spans.index, late, stale, rejected, replayed
        ):
            acks.append(await dead_letters.send(fetched, record, reason, detail))
        if scored.challenger is not None and self.shadow is not None:
            acks.extend(await self.shadow.send(spans, fetched, ready, scored, t_scored))
        failed = ready & ~stale & ~np.isfinite(scores)
        if self.summaries is not None:
            accepted = ~late if replayed is None else ~late & ~replayed[spans.index]
            # sent, and acknowledged, before the next commit (`CommitTracker`)
            self.summaries.add(
                spans, slots, accepted, ready & ~stale & ~failed, scores, feats.values, model
            )
        n_errors = int(failed.sum())
        if n_errors:
            PREDICTION_ERRORS.labels(model.name, model.version, NON_FINITE).inc(n_errors)
        scored_rows = rows[ready[rows] & ~failed[rows]]  # signals with a score
        self.telemetry.scored(
            fetched,
            (model.name, model.version),
            slots[scored_rows],
            spans.index[scored_rows],
            (started_ns, t_decoded, t_featured, t_scored, t_produced),
            len(spans) - int(ready.sum()) - int(late.sum()),
        )
        self.processed += len(fetched)
        self.latest_rows.publish(spans.event_ns, feats.values, ready, slots)
        return acks

    def _slots(self, spans: TickSpans, fetched: Fetched) -> np.ndarray:
        """Feature slot of each row; symbols seen for the first time get one here."""
        slots = self._symbol_table.lookup(spans)
        unknown = np.flatnonzero(slots < 0)
        if unknown.size:
            # rare (a new symbol, or bytes that only share a known symbol's hash):
            # resolved by name, one row at a time
            names = spans.symbols(unknown)
            slots[unknown] = self.engine.slots(names)  # FULL (-1) past max_symbols
            text = spans.text
            for row, slot, name in zip(
                unknown.tolist(), slots[unknown].tolist(), names, strict=True
            ):
                if slot >= 0:
                    start, length = int(spans.sym_start[row]), int(spans.sym_len[row])
                    self._symbol_table.add(text[start : start + length].tobytes(), slot)
                    self.telemetry.symbols.add(slot, name)
            # keys pin a symbol to one partition: remember it for snapshots
            held = slots[unknown] >= 0
            partitions = fetched.partition[spans.index[unknown[held]]].tolist()
            self.recovery.pin([n for n, h in zip(names, held, strict=True) if h], partitions)
        return slots

    def _over_capacity(
        self, spans: TickSpans, slots: np.ndarray, rejected: list[Rejected]
    ) -> tuple[TickSpans, np.ndarray]:
        """Rows of symbols that got no slot become dead letters (reason ``capacity``).

        Producers decide which symbols arrive; `max_symbols` bounds the state they can
        make the worker hold, and the worker goes on with the symbols it has.
        """
        over = slots < 0
        if not over.any():
            return spans, slots
        limit = self.engine.max_symbols
        for record in spans.index[over].tolist():
            rejected.append(Rejected(record, "capacity", f"max_symbols={limit} symbols held"))
        rejected.sort(key=lambda bad: bad.index)
        kept = np.flatnonzero(~over)
        return spans.take(kept), slots[kept]

    def _signal_batches(
        self,
        spans: TickSpans,
        rows: np.ndarray,
        fetched: Fetched,
        ready: np.ndarray,
        scores: np.ndarray,
        model: LoadedModel,
        received_ns: int,
        stamps: tuple[int, int, int],
        row_headers: dict[int, Sequence[tuple[str, bytes]]] | None = None,
    ) -> list[tuple[int, bytes, int]]:
        """The signals of `rows` as record batches, one or more per partition.

        A signal names its tick by (partition, offset), so consumers can drop a
        redelivered one. It goes to the partition number of its tick (mod the signals topic's
        partition count): symbols keep their order, since a symbol's ticks share a
        partition. Every signal carries header `t`: when its micro-batch was received,
        decoded, featured, scored and encoded (ns since the epoch), the in-process
        latency breakdown; "encoded" is stamped once the records are built. The
        signals of traced ticks carry their `traceparent` too (`row_headers`).
        """
        records = spans.index[rows]
        partition = fetched.partition[records]
        return encode_signal_batches(
            spans.text,
            sym_start=spans.sym_start[rows],
            sym_len=spans.sym_len[rows],
            key_start=spans.key_start[rows],
            key_len=spans.key_len[rows],
            tid_start=spans.tid_start[rows],
            tid_len=spans.tid_len[rows],
            event_ns=spans.event_ns[rows],
            recv_ns=spans.recv_ns[rows],
            tick_partition=partition,
            tick_offset=fetched.offset[records],
            emit_ns=stamps[2],
            model=model.name,
            version=model.version,
            scores=scores,
            threshold=self.config.threshold,
            partition=partition % self._signal_partitions,
            ready=ready,
            timestamp_ms=time.time_ns() // 1_000_000,
            headers=[("t", STAGES.pack(received_ns, *stamps, 0))],
            stamp_last=time.time_ns,
            row_headers=row_headers,
        )

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Restore assigned partitions' symbols and position the source to replay."""
        for tp, start in (await self.recovery.restore(self.source, assigned)).items():
            self.commits.restored(tp, start)
        self.progress.restart()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Snapshot revoked partitions (between batches) so their next owner resumes exactly."""
        async with self._batch_lock:
            await self.commits.reap(block=True)  # everything processed is now acknowledged
            committed = await self.commits.commit()
            if committed or not self.commits.transactional:
                # at least once, the signals are acknowledged even where the commit
                # failed; a transaction that did not commit took them back
                await self.recovery.write(self.recovery.take(list(revoked)))
            self.commits.forget(revoked)
            self.recovery.forget(revoked)
            self.telemetry.forget(revoked)
            self.progress.forget(revoked)
