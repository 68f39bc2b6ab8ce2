"""The stream worker: ticks -> features -> scores -> signals, one micro-batch at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from prometheus_client import Counter, Histogram

from features.engine import FeatureEngine
from features.kernels import STATUS_LATE
from features.online import OnlineWriter
from inference.batcher import BatcherConfig, BatchScores, MicroBatcher
from inference.registry import LoadedModel
from stream.kafka import make_consumer, make_producer, start_client, wait_assigned
from stream.signal import DOWN, FLAT, UP, encode_signal
from stream.tick import decode_batch

logger = logging.getLogger(__name__)

TICKS = Counter("ticks_total", "Tick records consumed")
PREDICTIONS = Counter("predictions_total", "Signals emitted", ["model", "version", "ready"])
DEAD_LETTERS = Counter("dead_letters_total", "Records sent to the dead-letter topic", ["reason"])
LATENCY = Histogram(
    "prediction_latency_seconds",
    "In-process service time of a micro-batch: records received -> signals handed to the producer",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH_SIZE = Histogram(
    "micro_batch_size", "Records per micro-batch", buckets=(1, 10, 100, 500, 1000, 2000, 5000)
)


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
    shadow_topic: str = ""  # challenger scores go here (never to signals); "" = not sent


class StreamWorker:
    """Wires consumer, FeatureEngine, model and producer; owns no feature or model logic.

    Offsets are committed only after every signal and dead letter of the batch is
    acknowledged by the broker (at-least-once: a crash replays, never skips).
    """

    def __init__(
        self,
        config: WorkerConfig,
        engine: FeatureEngine,
        model: LoadedModel,
        writer: OnlineWriter | None = None,
        batcher: MicroBatcher | None = None,
    ):
        """Hold the parts; `run` connects to Kafka. Scoring goes through `batcher`."""
        self.config = config
        self.engine = engine
        self.batcher = batcher or MicroBatcher(
            model, engine.spec.n_features, BatcherConfig(max_batch=config.max_batch)
        )
        self.writer = writer
        self.producer: AIOKafkaProducer | None = None
        self.assigned = asyncio.Event()
        self.last_rows: dict[str, tuple[int, np.ndarray]] = {}
        self.processed = 0

    @property
    def model(self) -> LoadedModel:
        """The champion serving now (a swap lands between two micro-batches)."""
        return self.batcher.model

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain, commit and close."""
        cfg = self.config
        consumer = make_consumer(
            cfg.bootstrap, cfg.group_id, [cfg.ticks_topic], cfg.fetch_max_wait_ms, cfg.max_batch
        )
        producer = make_producer(cfg.bootstrap, cfg.linger_ms)
        await start_client(producer, cfg.bootstrap)
        try:
            await start_client(consumer, cfg.bootstrap)
        except Exception:
            await producer.stop()
            raise
        self.producer = producer
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
                    await self.process(batches)
                    await consumer.commit({tp: msgs[-1].offset + 1 for tp, msgs in batches.items()})
        finally:
            await consumer.stop()
            await producer.stop()
            if self.writer is not None:
                self.writer.close()
            logger.info("worker stopped", extra={"processed": self.processed})

    async def process(self, batches: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        """Score one micro-batch and wait until its signals and dead letters are acknowledged."""
        started = time.perf_counter()
        assert self.producer is not None
        records = [m for msgs in batches.values() for m in msgs]
        cfg = self.config
        cols, rejected = decode_batch([m.value for m in records], time.time_ns(), cfg.max_future_ns)
        slots = self.engine.slots(cols.symbols)
        feats = self.engine.update(slots, cols.event_ns, cols.price, cols.quantity, cols.is_buy)
        ready = feats.ready
        # one batcher call per micro-batch: every row of it is scored by the same version
        scored = self.batcher.score_batch(feats.values[ready], cols.recv_ns[ready])
        scores = np.full(len(cols), np.nan)
        scores[ready] = scored.scores
        stale = np.zeros(len(cols), np.bool_)
        stale[ready] = scored.stale

        model, version = scored.model.name, scored.model.version
        emit_ns = time.time_ns()
        send = self.producer.send
        acks = []
        late = feats.status == STATUS_LATE
        for i, symbol in enumerate(cols.symbols):
            record = records[cols.index[i]]
            if late[i]:
                acks.append(await self._dead_letter(record, "late", "older than the open bar"))
                continue
            if stale[i]:
                acks.append(await self._dead_letter(record, "stale", "past the staleness deadline"))
                continue
            score = float(scores[i]) if ready[i] else None
            direction = FLAT if score is None else (UP if score >= cfg.threshold else DOWN)
            value = encode_signal(
                symbol, cols.trade_ids[i], int(cols.event_ns[i]), int(cols.recv_ns[i]), emit_ns,
                model, version if score is not None else "", score, direction,
            )  # fmt: skip
            acks.append(await send(cfg.signals_topic, value, key=record.key))
        if scored.challenger is not None and cfg.shadow_topic:
            acks.extend(await self._shadow(cols, records, ready, scored, emit_ns))
        for bad in rejected:
            acks.append(await self._dead_letter(records[bad.index], bad.reason, bad.detail))
        LATENCY.observe(time.perf_counter() - started)
        await asyncio.gather(*acks)

        n_ready = int(ready.sum())
        n_stale = int(stale.sum())
        TICKS.inc(len(records))
        BATCH_SIZE.observe(len(records))
        PREDICTIONS.labels(model, version, "true").inc(n_ready - n_stale)
        PREDICTIONS.labels(model, "", "false").inc(len(cols) - n_ready - int(late.sum()))
        self.processed += len(records)
        self._publish_latest(cols.symbols, cols.event_ns, feats.values, ready, slots)

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
        acks = []
        for i in np.flatnonzero(~np.isnan(shadow)):
            score = float(shadow[i])
            value = encode_signal(
                cols.symbols[i], cols.trade_ids[i], int(cols.event_ns[i]), int(cols.recv_ns[i]),
                emit_ns, challenger.name, challenger.version, score,
                UP if score >= cfg.threshold else DOWN,
            )  # fmt: skip
            key = records[cols.index[i]].key
            acks.append(await self.producer.send(cfg.shadow_topic, value, key=key))
        return acks

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
