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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError
from prometheus_client import Counter, Histogram

from features import snapshot
from features.engine import FeatureEngine
from features.kernels import STATUS_LATE, keep_latest
from features.online import OnlineWriter
from features.snapshot import SnapshotStore
from inference.batcher import BatcherConfig, BatchScores, MicroBatcher
from inference.registry import LoadedModel
from stream.contracts import tickcodec
from stream.contracts.signal import STAGES, encode_signals
from stream.contracts.tickcodec import SymbolTable, TickSpans, decode_columns
from stream.kafka import aiokafka_adapter, signalbatch, wire
from stream.kafka.aiokafka_adapter import send_batches
from stream.kafka.clients import (
    MAX_PARTITION_FETCH_BYTES,
    make_consumer,
    make_producer,
    start_client,
    wait_assigned,
)
from stream.kafka.fetched import Fetched, GapRetries
from stream.kafka.signalbatch import encode_signal_batches
from stream.kafka.wire import WireFetcher, WireProducer

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
# how often the newest feature rows are handed to the online writer (which flushes every
# TICKSERVE_ONLINE_FLUSH_S, 0.25 s by default)
OFFER_INTERVAL_S = 0.025

# (trade_ids, symbols, feature values, ready) of each micro-batch, for audits and tests
FeatureTap = Callable[[list[str], list[str], np.ndarray, np.ndarray], None]


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
    # acknowledged offsets are committed at most this often (one OffsetCommit per
    # micro-batch was ~10% of the worker's CPU at 60 batches/s); a crash replays at
    # most this much more, at-least-once either way
    commit_interval_s: float = 0.1
    shadow_topic: str = ""  # challenger scores go here (never to signals); "" = not sent
    # ticks and signals over stream.kafka.wire's own Fetch/Produce connections (aiokafka keeps
    # the group, commits and the rare sends); False: aiokafka's data path (TLS, SASL)
    wire: bool = True
    # one write per micro-batch: the next Fetch leaves with the signals' Produce
    # (less CPU, a later Fetch; see stream.kafka.wire.WireFetcher)
    one_write: bool = True


class StreamWorker:
    """Wires consumer, FeatureEngine, model and producer; owns no feature or model logic.

    Offsets are committed only after every signal and dead letter of the batch is
    acknowledged by the broker (at-least-once: a crash replays, never skips), at most
    every `commit_interval_s`, and always on revoke and on shutdown.

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
        # newest ready row and its event time per feature slot (-1: none yet), see `latest`
        self._latest_ns = np.full(0, -1, np.int64)
        self._latest_values = np.zeros((0, engine.spec.n_features))
        self._unoffered = np.zeros(0, np.bool_)  # slots updated since the last offer
        self._last_offer = 0.0
        self.processed = 0
        self.partition_of: dict[str, int] = {}
        self.next_offsets: dict[TopicPartition, int] = {}  # committed
        self.processed_offsets: dict[TopicPartition, int] = {}  # applied to the state
        self._inflight: deque[asyncio.Task[None]] = deque()
        self.replay_until: dict[TopicPartition, int] = {}
        self._batch_lock = asyncio.Lock()
        self._last_snapshot = time.monotonic()
        self._acked: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self._last_commit = time.monotonic()
        self._signal_partitions = 0
        self._symbol_table = SymbolTable()
        self._gaps = GapRetries()  # the local broker's not-yet-readable batches
        self._wire: WireProducer | None = None
        self._predictions: dict[tuple[str, str], tuple[Any, Any]] = {}

    @property
    def model(self) -> LoadedModel:
        """The champion serving now (a swap lands between two micro-batches)."""
        return self.batcher.model

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then commit, snapshot and close."""
        cfg = self.config
        aiokafka_adapter.install()  # record batches parsed as columns
        for codec in (aiokafka_adapter, tickcodec, signalbatch, wire):
            # load (or compile: ~10 s with a cold Numba cache) before joining the group,
            # not on the first micro-batch while ticks pile up
            codec.warm_up()
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
        fetcher = None
        if cfg.wire:
            fetcher = WireFetcher(
                consumer, cfg.ticks_topic, cfg.fetch_max_wait_ms,
                partition_max_bytes=MAX_PARTITION_FETCH_BYTES, gaps=self._gaps,
                one_write=cfg.one_write,
            )  # fmt: skip
            self._wire = WireProducer(producer, share=fetcher if cfg.one_write else None)
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
                if fetcher is not None:
                    fetched = await fetcher.poll(100)
                else:
                    fetched = await aiokafka_adapter.drain(
                        consumer, cfg.ticks_topic, 100, self._gaps
                    )
                if len(fetched):
                    async with self._batch_lock:
                        await self._handle(fetched)
                elif fetched.next_offsets:  # only skipped offsets: move the commit along
                    self.processed_offsets.update(fetched.next_offsets)
                await self._reap(block=False)
                if not len(fetched):
                    self._offer(force=False)  # a quiet stream still reaches the online store
                if self._acked and not self._inflight and self._commit_due():
                    await self._commit()  # a quiet stream still commits what was acked
            clean = True
        finally:
            try:
                if clean:
                    async with self._batch_lock:
                        await self._reap(block=True)
                        if await self._commit():
                            snaps = self._take_snapshots()
                            await asyncio.gather(*self._write_snapshots(snaps))
            finally:
                if fetcher is not None:
                    await fetcher.close()
                if self._wire is not None:
                    await self._wire.close()
                await consumer.stop()
                await producer.stop()
            if self.writer is not None:
                self._offer(force=True)
                self.writer.close()
            if self.snapshots is not None:
                self.snapshots.close()
            logger.info("worker stopped", extra={"processed": self.processed})

    async def _handle(self, fetched: Fetched) -> None:
        """Process a micro-batch; its acks and commit complete in the background, in order.

        The next batch is fetched and scored while this one's signals are still on
        their way to the broker. Offsets are committed only once every earlier batch
        is committed and this one's signals are acknowledged, so at-least-once holds.
        """
        for tp in fetched.next_offsets:
            expected = self.processed_offsets.get(tp)
            first = np.flatnonzero(fetched.partition == tp.partition)[:1]
            if expected is not None and first.size and fetched.offset[first[0]] != expected:
                # Kafka may skip offsets (compaction, transaction markers); none of those
                # apply to `ticks`, so a gap means records were not delivered to us.
                OFFSET_GAPS.inc()
                logger.warning(
                    "offset gap",
                    extra={"partition": tp.partition, "expected": expected,
                           "got": int(fetched.offset[first[0]])},
                )  # fmt: skip
        acks = await self.process(fetched)
        offsets = dict(fetched.next_offsets)
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
        self._acked.update(offsets)
        # a snapshot is written only once the offsets it reflects are committed
        if (snaps or self._commit_due()) and await self._commit():
            await asyncio.gather(*self._write_snapshots(snaps))

    def _commit_due(self) -> bool:
        return time.monotonic() - self._last_commit >= self.config.commit_interval_s

    async def _commit(self) -> bool:
        """Commit every acknowledged offset; False if the group moved on (rebalance)."""
        offsets, self._acked = self._acked, {}
        self._last_commit = time.monotonic()
        if not offsets:
            return True
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            # the group moved on (rebalance): the new owner replays these records
            logger.warning("commit failed", extra={"error": str(exc)})
            return False
        self.next_offsets.update(offsets)
        return True

    async def _reap(self, block: bool) -> None:
        """Collect finished batches (re-raising their errors); with `block`, all of them."""
        while self._inflight and (block or self._inflight[0].done()):
            await self._inflight.popleft()

    async def process(self, fetched: Fetched) -> list[asyncio.Future[Any]]:
        """Score one micro-batch and hand its signals and dead letters to the producer.

        Columns all the way: record values are decoded from the fetch buffer in bulk,
        symbols map to feature slots through a hash table, and the signals are
        written into Kafka record batches by one Numba pass (`stream.kafka.signalbatch`). Python
        runs per record only for dead letters, new symbols and shadow scores.

        Returns the futures of their acknowledgements.
        """
        started = time.perf_counter()
        started_ns = time.time_ns()
        cfg = self.config
        spans, rejected = decode_columns(
            fetched.buf, fetched.value_start, fetched.value_len, started_ns, cfg.max_future_ns
        )
        t_decoded = time.time_ns()
        slots = self._slots(spans, fetched)
        feats = self.engine.update(
            slots, spans.event_ns, spans.price, spans.quantity, spans.is_buy
        )  # fmt: skip
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
        replayed = self._replayed(fetched)  # per record: already has its signal
        late = feats.status == STATUS_LATE
        keep = ~late & ~stale
        if replayed is not None:
            keep &= ~replayed[spans.index]
        rows = np.flatnonzero(keep)
        acks = await self._send_signals(spans, rows, fetched.partition[spans.index[rows]],
                                        scores[rows], model, started_ns,
                                        (t_decoded, t_featured, t_scored))  # fmt: skip
        for mask, reason, detail in ((late, "late", "older than the open bar"),
                                     (stale, "stale", "past the staleness deadline")):  # fmt: skip
            for record in spans.index[mask].tolist():
                if replayed is None or not replayed[record]:
                    acks.append(await self._dead_letter(fetched, record, reason, detail))
        for bad in rejected:
            if replayed is None or not replayed[bad.index]:
                acks.append(await self._dead_letter(fetched, bad.index, bad.reason, bad.detail))
        if scored.challenger is not None and cfg.shadow_topic:
            acks.extend(await self._shadow(spans, fetched, ready, scored, t_scored))
        LATENCY.observe(time.perf_counter() - started)

        n_ready = int(ready.sum())
        n_stale = int(stale.sum())
        TICKS.inc(len(fetched))
        BATCH_SIZE.observe(len(fetched))
        served, not_ready = self._prediction_counters(model)
        served.inc(n_ready - n_stale)
        not_ready.inc(len(spans) - n_ready - int(late.sum()))
        self.processed += len(fetched)
        self._publish_latest(spans.event_ns, feats.values, ready, slots)
        return acks

    def _prediction_counters(self, model: LoadedModel) -> tuple[Any, Any]:
        """PREDICTIONS children of this model: scored, and not ready (looked up once)."""
        key = (model.name, model.version)
        counters = self._predictions.get(key)
        if counters is None:
            counters = (PREDICTIONS.labels(model.name, model.version, "true"),
                        PREDICTIONS.labels(model.name, "", "false"))  # fmt: skip
            self._predictions[key] = counters
        return counters

    def _slots(self, spans: TickSpans, fetched: Fetched) -> np.ndarray:
        """Feature slot of each row; symbols seen for the first time get one here."""
        slots = self._symbol_table.lookup(spans)
        unknown = np.flatnonzero(slots < 0)
        if unknown.size:
            # rare (a new symbol, or bytes that only share a known symbol's hash):
            # resolved by name, one row at a time
            names = spans.symbols(unknown)
            slots[unknown] = self.engine.slots(names)
            text = spans.text
            for row, name, slot in zip(unknown.tolist(), names, slots[unknown].tolist(),
                                       strict=True):  # fmt: skip
                start, length = int(spans.sym_start[row]), int(spans.sym_len[row])
                self._symbol_table.add(text[start : start + length].tobytes(), slot)
                if name not in self.partition_of:
                    # keys pin a symbol to one partition: remember it for snapshots
                    self.partition_of[name] = int(fetched.partition[spans.index[row]])
        return slots

    async def _send_signals(
        self,
        spans: TickSpans,
        rows: np.ndarray,
        partition: np.ndarray,
        scores: np.ndarray,
        model: LoadedModel,
        received_ns: int,
        stamps: tuple[int, int, int],
    ) -> list[asyncio.Future[Any]]:
        """Send the signals of `rows` as prebuilt record batches, one or more per partition.

        A signal goes to the partition number of its tick (mod the signals topic's
        partition count): symbols keep their order, since a symbol's ticks share a
        partition. Every signal carries header `t`: when its micro-batch was received,
        decoded, featured, scored and encoded (ns since the epoch), the in-process
        latency breakdown; "encoded" is stamped once the records are built.
        """
        producer = self.producer
        assert producer is not None
        topic = self.config.signals_topic
        if self._signal_partitions == 0:
            self._signal_partitions = len(await producer.partitions_for(topic))
        if not rows.size:
            return []
        batches = encode_signal_batches(
            spans.text,
            sym_start=spans.sym_start[rows], sym_len=spans.sym_len[rows],
            key_start=spans.key_start[rows], key_len=spans.key_len[rows],
            tid_start=spans.tid_start[rows], tid_len=spans.tid_len[rows],
            event_ns=spans.event_ns[rows], recv_ns=spans.recv_ns[rows],
            emit_ns=stamps[2], model=model.name, version=model.version, scores=scores,
            threshold=self.config.threshold, partition=partition % self._signal_partitions,
            timestamp_ms=time.time_ns() // 1_000_000,
            headers=[("t", STAGES.pack(received_ns, *stamps, 0))], stamp_last=time.time_ns,
        )  # fmt: skip
        if self._wire is not None:
            return self._wire.send(topic, batches)
        return await send_batches(producer, topic, batches)

    def _replayed(self, fetched: Fetched) -> np.ndarray | None:
        """Per record: True where it already has a signal (re-read after a restore)."""
        if not self.replay_until:
            return None
        out = np.zeros(len(fetched), np.bool_)
        for tp, next_offset in fetched.next_offsets.items():
            until = self.replay_until.get(tp)
            if until is None:
                continue
            out |= (fetched.partition == tp.partition) & (fetched.offset < until)
            if next_offset >= until:
                del self.replay_until[tp]
                logger.info("replay done", extra={"partition": tp.partition, "offset": until})
        REPLAYED.inc(int(out.sum()))
        return out

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
            await self._reap(block=True)  # everything processed is now acknowledged
            await self._commit()
            await asyncio.gather(*self._write_snapshots(self._take_snapshots(list(revoked))))
            for tp in revoked:
                self.next_offsets.pop(tp, None)
                self.processed_offsets.pop(tp, None)
                self.replay_until.pop(tp, None)

    def _publish_latest(
        self, event_ns: np.ndarray, values: np.ndarray, ready: np.ndarray, slots: np.ndarray
    ) -> None:
        """Keep the newest ready row per symbol, and offer it to the online writer."""
        pad = self.engine.fstate.shape[0] - self._latest_ns.shape[0]
        if pad > 0:  # the engine grew its slots: grow alike
            self._latest_ns = np.concatenate([self._latest_ns, np.full(pad, -1, np.int64)])
            self._latest_values = np.concatenate([self._latest_values,
                                                  np.zeros((pad, values.shape[1]))])  # fmt: skip
            self._unoffered = np.concatenate([self._unoffered, np.zeros(pad, np.bool_)])
        keep_latest(slots, event_ns, values, ready, self._latest_ns, self._latest_values,
                    self._unoffered)  # fmt: skip
        self._offer(force=False)

    def _offer(self, force: bool) -> None:
        """Hand the rows updated since the last offer to the online writer.

        At most every OFFER_INTERVAL_S (unless `force`): the writer keeps only the
        newest row per symbol anyway, and a Python list per micro-batch cost more
        than the rest of the bookkeeping together.
        """
        now = time.monotonic()
        if self.writer is None or not (force or now - self._last_offer >= OFFER_INTERVAL_S):
            return
        self._last_offer = now
        slots = np.flatnonzero(self._unoffered)
        if not slots.size:
            return
        self._unoffered[slots] = False
        names = self.engine.symbols
        self.writer.offer([names[s] for s in slots.tolist()], self._latest_ns[slots],
                          self._latest_values[slots])  # fmt: skip

    def latest(self, symbol: str) -> tuple[int, np.ndarray] | None:
        """The newest ready feature row of `symbol` and its event time, None if none yet."""
        slot = self.engine.slot_of.get(symbol)
        if slot is None or slot >= self._latest_ns.shape[0] or self._latest_ns[slot] < 0:
            return None
        return int(self._latest_ns[slot]), self._latest_values[slot].copy()

    async def _shadow(
        self,
        spans: TickSpans,
        fetched: Fetched,
        ready: np.ndarray,
        scored: BatchScores,
        emit_ns: int,
    ) -> list[asyncio.Future[Any]]:
        """Challenger signals for the rows it scored, to the shadow topic only."""
        assert self.producer is not None and scored.challenger is not None
        shadow = np.full(len(spans), np.nan)
        shadow[ready] = scored.shadow
        cfg, challenger = self.config, scored.challenger
        rows = np.flatnonzero(~np.isnan(shadow))
        values = encode_signals(
            spans.symbols(rows), spans.trade_ids(rows),
            spans.event_ns[rows].tolist(), spans.recv_ns[rows].tolist(), emit_ns,
            challenger.name, challenger.version, shadow[rows].tolist(), cfg.threshold,
        )  # fmt: skip
        send = self.producer.send
        return [await send(cfg.shadow_topic, v, key=fetched.key(i))
                for i, v in zip(spans.index[rows].tolist(), values, strict=True)]  # fmt: skip

    async def _dead_letter(
        self, fetched: Fetched, record: int, reason: str, detail: str
    ) -> asyncio.Future[Any]:
        """The record as it arrived, to the dead-letter topic, with why and where from."""
        assert self.producer is not None
        DEAD_LETTERS.labels(reason).inc()
        where = f"{fetched.topic}/{fetched.partition[record]}/{fetched.offset[record]}"
        headers = [
            ("reason", reason.encode()),
            ("detail", detail.encode()[:1000]),
            ("source", where.encode()),
        ]
        return await self.producer.send(
            self.config.dlq_topic, fetched.value(record), key=fetched.key(record), headers=headers
        )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to the worker."""

    def __init__(self, worker: StreamWorker):
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.worker.on_assigned(assigned)
