"""The stream worker: ticks -> features -> scores -> signals, one micro-batch at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError
from prometheus_client import Counter, Histogram

from features import snapshot
from features.engine import FeatureEngine
from features.kernels import STATUS_LATE
from features.online import OnlineWriter
from features.snapshot import SnapshotStore
from inference.batcher import BatcherConfig, BatchScores, MicroBatcher
from inference.registry import LoadedModel
from stream.kafka import make_consumer, make_producer, start_client, wait_assigned
from stream.signal import STAGES, encode_signals
from stream.tick import decode_batch

logger = logging.getLogger(__name__)

TICKS = Counter("ticks_total", "Tick records consumed")
REPLAYED = Counter("replayed_ticks_total", "Records re-applied to feature state without signals")
PREDICTIONS = Counter("predictions_total", "Signals emitted", ["model", "version", "ready"])
DEAD_LETTERS = Counter("dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
LATENCY = Histogram(
    "prediction_latency_seconds",
    "In-process service time of a micro-batch: records received -> signals handed to the producer",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
OFFSET_GAPS = Counter("consumer_offset_gaps_total", "Fetched batches that skipped offsets")
BATCH_SIZE = Histogram(
    "micro_batch_size", "Records per micro-batch", buckets=(1, 10, 100, 500, 1000, 2000, 5000)
)

# micro-batches whose signals may be awaiting acks at once (backpressure beyond that)
MAX_INFLIGHT_BATCHES = 4

# (trade_ids, symbols, feature values, ready) of each micro-batch, for audits and tests
FeatureTap = Callable[[list[str], list[str], np.ndarray, np.ndarray], None]
Batches = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Topics, group and client knobs of one worker process."""

    bootstrap: str
    ticks_topic: str
    signals_topic: str
    dlq_topic: str
    group_id: str
    fetch_max_wait_ms: int = 20
    linger_ms: int = 5
    max_batch: int = 2000
    max_future_ns: int = 5_000_000_000
    threshold: float = 0.5
    snapshot_interval_s: float = 10.0
    shadow_topic: str = ""  # challenger scores go here (never to signals); "" = not sent


class StreamWorker:
    """Wires consumer, FeatureEngine, model and producer; owns no feature or model logic.

    Offsets are committed only after every signal and dead letter of the batch is
    acknowledged by the broker (at-least-once: a crash replays, never skips).

    Feature state survives restarts and rebalances: each partition's symbols are
    snapshotted with the offset they reflect (periodically, when the partition is
    revoked, and on shutdown). A newly assigned partition is restored from its
    snapshot and re-read from the snapshot's offset; records before the committed
    offset already have signals, so they only update features (no duplicates).
    """

    def __init__(
        self,
        config: WorkerConfig,
        engine: FeatureEngine,
        model: LoadedModel,
        writer: OnlineWriter | None = None,
        snapshots: SnapshotStore | None = None,
        feature_tap: FeatureTap | None = None,
        batcher: MicroBatcher | None = None,
    ):
        """Hold the parts; `run` connects to Kafka. Scoring goes through `batcher`."""
        self.config = config
        self.engine = engine
        self.batcher = batcher or MicroBatcher(
            model, engine.spec.n_features, BatcherConfig(max_batch=config.max_batch)
        )
        self.writer = writer
        self.snapshots = snapshots
        self.feature_tap = feature_tap
        self.producer: AIOKafkaProducer | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned = asyncio.Event()
        self.last_rows: dict[str, tuple[int, np.ndarray]] = {}
        self.processed = 0
        self.partition_of: dict[str, int] = {}
        self.next_offsets: dict[TopicPartition, int] = {}  # committed
        self.processed_offsets: dict[TopicPartition, int] = {}  # applied to the state
        self._inflight: deque[asyncio.Task[None]] = deque()
        self.replay_until: dict[TopicPartition, int] = {}
        self._batch_lock = asyncio.Lock()
        self._last_snapshot = time.monotonic()
        self._signal_partitions = 0

    @property
    def model(self) -> LoadedModel:
        """The champion serving now (a swap lands between two micro-batches)."""
        return self.batcher.model

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then commit, snapshot and close."""
        cfg = self.config
        consumer = make_consumer(
            cfg.bootstrap, cfg.group_id, [cfg.ticks_topic], cfg.fetch_max_wait_ms, cfg.max_batch,
            listener=_Rebalance(self),
        )  # fmt: skip
        producer = make_producer(cfg.bootstrap, cfg.linger_ms)
        # set before start: the group join (and its assignment callback) may run inside it
        self.producer, self.consumer = producer, consumer
        await start_client(producer, cfg.bootstrap)
        try:
            await start_client(consumer, cfg.bootstrap)
        except Exception:
            await producer.stop()
            raise
        clean = False
        try:
            await wait_assigned(consumer)
            self.assigned.set()
            logger.info(
                "worker consuming",
                extra={"topic": cfg.ticks_topic, "model": self.model.name,
                       "version": self.model.version},
            )  # fmt: skip
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=100, max_records=cfg.max_batch)
                if batches:
                    async with self._batch_lock:
                        await self._handle(batches)
                await self._reap(block=False)
            clean = True
        finally:
            if clean:
                async with self._batch_lock:
                    await self._reap(block=True)
                    await asyncio.gather(*self._write_snapshots(self._take_snapshots()))
            await consumer.stop()
            await producer.stop()
            if self.writer is not None:
                self.writer.close()
            if self.snapshots is not None:
                self.snapshots.close()
            logger.info("worker stopped", extra={"processed": self.processed})

    async def _handle(self, batches: Batches) -> None:
        """Process a micro-batch; its acks and commit complete in the background, in order.

        The next batch is fetched and scored while this one's signals are still on
        their way to the broker. Offsets are committed only once every earlier batch
        is committed and this one's signals are acknowledged, so at-least-once holds.
        """
        for tp, msgs in batches.items():
            expected = self.processed_offsets.get(tp)
            if expected is not None and msgs[0].offset != expected:
                # Kafka may skip offsets (compaction, transaction markers); none of those
                # apply to `ticks`, so a gap means records were not delivered to us.
                OFFSET_GAPS.inc()
                logger.warning(
                    "offset gap",
                    extra={"partition": tp.partition, "expected": expected,
                           "got": msgs[0].offset},
                )  # fmt: skip
        acks = await self.process(batches)
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
        self.processed_offsets.update(offsets)
        snaps: list[tuple[TopicPartition, snapshot.Snapshot]] = []
        if time.monotonic() - self._last_snapshot > self.config.snapshot_interval_s:
            snaps = self._take_snapshots()  # the state now, written once it is committed
        previous = self._inflight[-1] if self._inflight else None
        self._inflight.append(asyncio.create_task(self._finish(previous, acks, offsets, snaps)))
        while len(self._inflight) > MAX_INFLIGHT_BATCHES:
            await self._inflight.popleft()

    async def _finish(
        self,
        previous: asyncio.Task[None] | None,
        acks: list[asyncio.Future[Any]],
        offsets: dict[TopicPartition, int],
        snaps: list[tuple[TopicPartition, snapshot.Snapshot]],
    ) -> None:
        if previous is not None:
            await previous
        await asyncio.gather(*acks)
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # the group moved on (rebalance): the new owner replays these records
            logger.warning("commit failed", extra={"error": str(exc)})
            return
        self.next_offsets.update(offsets)
        await asyncio.gather(*self._write_snapshots(snaps))

    async def _reap(self, block: bool) -> None:
        """Collect finished batches (re-raising their errors); with `block`, all of them."""
        while self._inflight and (block or self._inflight[0].done()):
            await self._inflight.popleft()

    async def process(self, batches: Batches) -> list[asyncio.Future[Any]]:
        """Score one micro-batch and hand its signals and dead letters to the producer.

        Returns the futures of their acknowledgements.
        """
        started = time.perf_counter()
        started_ns = time.time_ns()
        records = [m for msgs in batches.values() for m in msgs]
        cfg = self.config
        cols, rejected = decode_batch([m.value for m in records], started_ns, cfg.max_future_ns)
        t_decoded = time.time_ns()
        known = len(self.engine.symbols)
        slots = self.engine.slots(cols.symbols)
        if len(self.engine.symbols) > known:
            self._learn_partitions(cols.symbols, cols.index, records)
        feats = self.engine.update(slots, cols.event_ns, cols.price, cols.quantity, cols.is_buy)
        t_featured = time.time_ns()
        if self.feature_tap is not None:
            self.feature_tap(cols.trade_ids, cols.symbols, feats.values, feats.ready)
        ready = feats.ready
        # one batcher call per micro-batch: every row of it is scored by the same version
        scored = self.batcher.score_batch(feats.values[ready], cols.recv_ns[ready])
        scores = np.full(len(cols), np.nan)
        scores[ready] = scored.scores
        stale = np.zeros(len(cols), np.bool_)
        stale[ready] = scored.stale

        t_scored = time.time_ns()

        model = scored.model
        replayed = self._replayed(batches) if self.replay_until else None
        late = feats.status == STATUS_LATE
        index = cols.index.tolist()
        keep = ~late & ~stale
        if replayed is not None:
            keep &= np.array([i not in replayed for i in index], np.bool_)
        rows = np.flatnonzero(keep).tolist()
        score_list = scores.tolist()
        ready_list = ready.tolist()
        values = encode_signals(
            [cols.symbols[i] for i in rows], [cols.trade_ids[i] for i in rows],
            cols.event_ns[rows].tolist(), cols.recv_ns[rows].tolist(), t_scored,
            model.name, model.version,
            [score_list[i] if ready_list[i] else None for i in rows], cfg.threshold,
        )  # fmt: skip
        out = [(records[index[i]].partition, records[index[i]].key, v)
               for i, v in zip(rows, values, strict=True)]  # fmt: skip
        dead: list[tuple[ConsumerRecord[Any, Any], str, str]] = [
            (records[index[i]], reason, detail)
            for mask, reason, detail in ((late, "late", "older than the open bar"),
                                         (stale, "stale", "past the staleness deadline"))
            for i in np.flatnonzero(mask).tolist()
            if replayed is None or index[i] not in replayed
        ]  # fmt: skip
        for bad in rejected:
            if replayed is None or bad.index not in replayed:
                dead.append((records[bad.index], bad.reason, bad.detail))
        # One header per batch: when its records were received, decoded, featured,
        # scored and encoded (ns since the epoch) -- the in-process latency breakdown.
        timing = STAGES.pack(started_ns, t_decoded, t_featured, t_scored, time.time_ns())
        acks = await self._send_grouped(out, [("t", timing)])
        acks.extend([await self._dead_letter(*d) for d in dead])
        if scored.challenger is not None and cfg.shadow_topic:
            acks.extend(await self._shadow(cols, records, ready, scored, t_scored))
        LATENCY.observe(time.perf_counter() - started)

        n_ready = int(ready.sum())
        n_stale = int(stale.sum())
        TICKS.inc(len(records))
        BATCH_SIZE.observe(len(records))
        PREDICTIONS.labels(model.name, model.version, "true").inc(n_ready - n_stale)
        PREDICTIONS.labels(model.name, "", "false").inc(len(cols) - n_ready - int(late.sum()))
        self.processed += len(records)
        self._publish_latest(cols.symbols, cols.event_ns, feats.values, ready, slots)
        return acks

    async def _send_grouped(
        self, out: list[tuple[int, bytes, bytes]], headers: list[tuple[str, bytes]]
    ) -> list[asyncio.Future[Any]]:
        """Send signals in one record batch per partition (far cheaper than send() per record).

        A signal goes to the partition number of its tick (mod the signals topic's
        partition count): symbols keep their order, since a symbol's ticks share a partition.
        """
        producer = self.producer
        assert producer is not None
        topic = self.config.signals_topic
        if self._signal_partitions == 0:
            self._signal_partitions = len(await producer.partitions_for(topic))
        n = self._signal_partitions
        builders: dict[int, Any] = {}
        acks = []
        now_ms = time.time_ns() // 1_000_000
        for partition, key, value in out:
            p = partition % n
            builder = builders.get(p)
            if builder is None:
                builder = builders[p] = producer.create_batch()
            if builder.append(timestamp=now_ms, key=key, value=value, headers=headers) is None:
                acks.append(await producer.send_batch(builder, topic, partition=p))
                builder = builders[p] = producer.create_batch()
                builder.append(timestamp=now_ms, key=key, value=value, headers=headers)
        for p, builder in builders.items():
            acks.append(await producer.send_batch(builder, topic, partition=p))
        return acks

    def _replayed(self, batches: Batches) -> set[int]:
        """Positions (in the flattened batch) of records that already have signals."""
        out: set[int] = set()
        base = 0
        for tp, msgs in batches.items():
            until = self.replay_until.get(tp)
            if until is not None:
                out.update(base + k for k, m in enumerate(msgs) if m.offset < until)
                if msgs[-1].offset + 1 >= until:
                    del self.replay_until[tp]
                    logger.info("replay done", extra={"partition": tp.partition, "offset": until})
            base += len(msgs)
        REPLAYED.inc(len(out))
        return out

    def _learn_partitions(
        self, symbols: list[str], index: np.ndarray, records: list[ConsumerRecord[Any, Any]]
    ) -> None:
        """Remember each new symbol's partition (keys pin a symbol to one partition)."""
        for i, symbol in enumerate(symbols):
            if symbol not in self.partition_of:
                self.partition_of[symbol] = records[index[i]].partition

    def _take_snapshots(
        self, partitions: list[TopicPartition] | None = None
    ) -> list[tuple[TopicPartition, snapshot.Snapshot]]:
        """Copy the state of these partitions' symbols with the offsets it reflects."""
        self._last_snapshot = time.monotonic()
        if self.snapshots is None:
            return []
        out = []
        for tp in partitions if partitions is not None else list(self.processed_offsets):
            offset = self.processed_offsets.get(tp)
            if offset is None or tp in self.replay_until:
                continue  # nothing applied yet, or the state is behind the commit
            symbols = [s for s, p in self.partition_of.items() if p == tp.partition]
            out.append((tp, snapshot.take(self.engine, symbols, offset)))
        return out

    def _write_snapshots(
        self, snaps: list[tuple[TopicPartition, snapshot.Snapshot]]
    ) -> list[asyncio.Future[None]]:
        assert self.snapshots is not None or not snaps
        return [
            asyncio.wrap_future(self.snapshots.save(tp.topic, tp.partition, snap))  # type: ignore[union-attr]
            for tp, snap in snaps
        ]

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Restore assigned partitions' symbols and position the consumer to replay."""
        consumer = self.consumer
        if self.snapshots is None or consumer is None:
            return
        for tp in assigned:
            committed = await consumer.committed(tp)
            snap = self.snapshots.load(tp.topic, tp.partition)
            if snap is not None and snap.spec_hash == self.engine.spec.hash:
                snapshot.restore(self.engine, snap)
                for symbol in snap.symbols:
                    self.partition_of[symbol] = tp.partition
                consumer.seek(tp, snap.next_offset)
                start = snap.next_offset
            elif committed:
                # no usable snapshot: rebuild the state from the start of the partition
                await consumer.seek_to_beginning(tp)
                start = 0
            else:
                continue
            if committed and committed > start:
                self.replay_until[tp] = committed
            self.next_offsets[tp] = self.processed_offsets[tp] = start
            logger.info(
                "partition restored",
                extra={"partition": tp.partition, "snapshot": snap is not None,
                       "from_offset": start, "committed": committed},
            )  # fmt: skip

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Snapshot revoked partitions (between batches) so their next owner resumes exactly."""
        async with self._batch_lock:
            await self._reap(block=True)  # everything processed is now committed
            await asyncio.gather(*self._write_snapshots(self._take_snapshots(list(revoked))))
            for tp in revoked:
                self.next_offsets.pop(tp, None)
                self.processed_offsets.pop(tp, None)
                self.replay_until.pop(tp, None)

    def _publish_latest(
        self,
        symbols: list[str],
        event_ns: np.ndarray,
        values: np.ndarray,
        ready: np.ndarray,
        slots: np.ndarray,
    ) -> None:
        """Hand the newest ready row per symbol to the online writer (coalesced, non-blocking)."""
        rows = np.flatnonzero(ready)
        if not rows.size:
            return
        # last ready row of each slot: unique over the reversed order keeps the last one
        _, first_rev = np.unique(slots[rows][::-1], return_index=True)
        last = rows[::-1][first_rev]
        latest_symbols = [symbols[i] for i in last]
        for i, symbol in zip(last, latest_symbols, strict=True):
            self.last_rows[symbol] = (int(event_ns[i]), values[i])
        if self.writer is not None:
            self.writer.offer(latest_symbols, event_ns[last], values[last])

    async def _shadow(
        self,
        cols: Any,
        records: list[ConsumerRecord[Any, Any]],
        ready: np.ndarray,
        scored: BatchScores,
        emit_ns: int,
    ) -> list[asyncio.Future[Any]]:
        """Challenger signals for the rows it scored, to the shadow topic only."""
        assert self.producer is not None and scored.challenger is not None
        shadow = np.full(len(cols), np.nan)
        shadow[ready] = scored.shadow
        cfg, challenger = self.config, scored.challenger
        rows = np.flatnonzero(~np.isnan(shadow)).tolist()
        values = encode_signals(
            [cols.symbols[i] for i in rows], [cols.trade_ids[i] for i in rows],
            cols.event_ns[rows].tolist(), cols.recv_ns[rows].tolist(), emit_ns,
            challenger.name, challenger.version, shadow[rows].tolist(), cfg.threshold,
        )  # fmt: skip
        index = cols.index.tolist()
        send = self.producer.send
        return [await send(cfg.shadow_topic, v, key=records[index[i]].key)
                for i, v in zip(rows, values, strict=True)]  # fmt: skip

    async def _dead_letter(
        self, record: ConsumerRecord[Any, Any], reason: str, detail: str
    ) -> asyncio.Future[Any]:
        assert self.producer is not None
        DEAD_LETTERS.labels(reason).inc()
        headers = [
            ("reason", reason.encode()),
            ("detail", detail.encode()[:1000]),
            ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        return await self.producer.send(
            self.config.dlq_topic, record.value, key=record.key, headers=headers
        )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to the worker."""

    def __init__(self, worker: StreamWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.worker.on_assigned(assigned)
