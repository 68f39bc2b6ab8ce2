"""Live exchange trades: websockets (through ccxt) -> the tick contract -> the ticks topic.

One process per exchange (`tickserve ingest`). Per symbol, a reader task awaits
ccxt's `watch_trades`, normalises each trade to the tick contract, drops trades it
has already published, counts gaps in the exchange's trade ids, and puts the encoded
tick on a bounded queue; one publisher task drains the queue to Kafka, keyed by
symbol. When the queue is full the readers wait (counted): ccxt meanwhile keeps at
most `tradesLimit` trades per symbol, so a broker that stays slow costs trades (seen
as gaps), never unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram

from stream.contracts.tick import Tick, validate
from stream.ingest.ccxt_adapter import cached_trades, open_exchange
from stream.kafka.clients import make_producer, start_client
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from tickserve.errors import BrokerError, ConfigError, InvalidTick

logger = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TICKS = Counter(
    "ingest_ticks_total",
    "Exchange trades normalised and queued for the ticks topic",
    ["exchange", "symbol"],
)
RECONNECTS = Counter(
    "ingest_reconnects_total", "Websocket connections opened again after a drop", ["exchange"]
)
GAPS = Counter(
    "ingest_gaps_total",
    "Jumps in an exchange's trade ids (trades never received)",
    ["exchange", "symbol"],
)
MISSED = Counter(
    "ingest_missed_trades_total",
    "Trade ids skipped over by the jumps in ingest_gaps_total",
    ["exchange", "symbol"],
)
DUPLICATES = Counter(
    "ingest_duplicates_total",
    "Trades received again after they were queued (dropped)",
    ["exchange", "symbol"],
)
MALFORMED = Counter(
    "ingest_malformed_total",
    "Websocket messages or trades that could not be read (skipped)",
    ["exchange"],
)
QUEUE_FULL = Counter(
    "ingest_queue_full_total",
    "Times a websocket reader waited because the publish queue was full",
    ["exchange"],
)
LAG = Histogram(
    "ingest_lag_seconds",
    "Exchange event time of a trade -> its receipt by the ingest process",
    ["exchange"],
    buckets=LAG_BUCKETS,
)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """What to ingest and where to publish it.

    Attributes:
        exchange: ccxt exchange id (binance, coinbase, kraken).
        symbols: Unified symbols (``BTC/USDT``); also the ticks' symbol and Kafka key.
        bootstrap: Kafka bootstrap servers.
        topic: The ticks topic.
        security: Kafka security settings (as every client uses).
        queue_size: Encoded ticks held between the readers and the publisher.
        backoff_min_s: First wait before reconnecting after an error; doubles per
            failure up to `backoff_max_s`, with jitter, and resets once trades arrive.
        max_future_ns: Tolerated clock skew of exchange event times (as the worker's).
        url: Websocket address instead of the exchange's own (tests, proxies).
        markets: ccxt markets instead of loading them from the exchange's REST API.
    """

    exchange: str
    symbols: tuple[str, ...]
    bootstrap: str
    topic: str
    security: KafkaSecurity = PLAINTEXT
    queue_size: int = 10_000
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    linger_ms: int = 5
    max_future_ns: int = 5_000_000_000
    url: str | None = None
    markets: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class TradeIds:
    """The last trade id queued per symbol: tells new trades from repeats and gaps.

    Exchanges number trades per symbol (Binance `t`, Coinbase `trade_id`, Kraken
    `trade_id`); ids that are not integers are passed through unchecked.
    """

    last: dict[str, int] = field(default_factory=dict)
    # the highest id taken from ccxt's cache (not from watch_trades): ids up to it that
    # watch_trades hands over later are repeats of our own reading, not the exchange's
    from_cache: dict[str, int] = field(default_factory=dict)

    def check(self, symbol: str, trade_id: str) -> int | None:
        """How many ids were skipped before `trade_id` (0: none), or None for a repeat.

        >>> ids = TradeIds()
        >>> [ids.check("A", i) for i in ("5", "6", "6", "4", "9", "x")]
        [0, 0, None, None, 2, 0]
        """
        try:
            number = int(trade_id)
        except ValueError:
            return 0
        last = self.last.get(symbol)
        if last is not None and number <= last:
            return None
        self.last[symbol] = number
        return 0 if last is None else number - last - 1


@dataclass(slots=True)
class IngestCounts:
    """Totals of one run (the metrics carry the same, labelled)."""

    queued: int = 0
    published: int = 0
    duplicates: int = 0
    gaps: int = 0
    missed: int = 0
    malformed: int = 0
    reconnects: int = 0
    queue_full: int = 0


def normalise(trade: dict[str, Any], recv_ns: int, max_future_ns: int) -> Tick:
    """A ccxt unified trade as a tick (exchange time in ms, as ccxt gives it).

    Raises:
        InvalidTick: The trade lacks a field the tick contract needs.

    >>> t = normalise({"symbol": "BTC/USDT", "timestamp": 1700000000123, "price": 37000.5,
    ...                "amount": 0.01, "side": "sell", "id": 42}, 1700000000200000000, 0)
    >>> (t.event_ns, t.side, t.trade_id, t.recv_ns)
    (1700000000123000000, 'sell', '42', 1700000000200000000)
    """
    timestamp = trade.get("timestamp")
    trade_id = trade.get("id")
    doc = {
        "symbol": trade.get("symbol"),
        "event_ns": timestamp * NS_PER_MS if type(timestamp) is int else timestamp,
        "price": trade.get("price"),
        "quantity": trade.get("amount"),
        "side": trade.get("side"),
        "trade_id": str(trade_id) if trade_id is not None else None,
        "recv_ns": recv_ns,
    }
    return validate(doc, recv_ns, max_future_ns)


class LiveIngest:
    """One exchange's trades for a set of symbols, published to the ticks topic.

    `run` returns when `stop` is set (after publishing what is queued) and raises
    ConfigError for an unknown exchange or symbol, BrokerError when Kafka fails.
    """

    def __init__(self, config: IngestConfig, stop: asyncio.Event) -> None:
        """Prepare (nothing connects before `run`)."""
        if not config.symbols:
            raise ConfigError("ingest needs at least one symbol")
        if config.queue_size < 1:
            raise ConfigError(f"queue size must be >= 1, got {config.queue_size}")
        self.config = config
        self.stop = stop
        self.counts = IngestCounts()
        self.ids = TradeIds()
        self.bad: dict[int, dict[str, Any]] = {}  # malformed trades already counted
        self.queue: asyncio.Queue[tuple[bytes, bytes] | None] = asyncio.Queue(config.queue_size)
        self.exchange = open_exchange(
            config.exchange, self._malformed, self._reconnected, config.url, config.markets
        )

    def _malformed(self, detail: str) -> None:
        self.counts.malformed += 1
        MALFORMED.labels(self.config.exchange).inc()
        logger.warning(
            "malformed message", extra={"exchange": self.config.exchange, "detail": detail}
        )

    def _reconnected(self) -> None:
        self.counts.reconnects += 1
        RECONNECTS.labels(self.config.exchange).inc()
        logger.info("reconnected", extra={"exchange": self.config.exchange})

    async def run(self) -> IngestCounts:
        """Read and publish until `stop` is set; returns the run's totals."""
        producer = make_producer(self.config.bootstrap, self.config.linger_ms, self.config.security)
        await start_client(producer, self.config.bootstrap, self.config.security)
        publisher = asyncio.create_task(self._publish(producer))
        readers = [asyncio.create_task(self._read(s)) for s in self.config.symbols]
        stopped = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait(
                [stopped, publisher, *readers], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()  # a reader's ConfigError or the publisher's BrokerError
        finally:
            for task in [*readers, stopped]:
                task.cancel()
            await asyncio.gather(*readers, stopped, return_exceptions=True)
            if not publisher.done():
                await self.queue.put(None)
                await publisher
            await producer.stop()
            await self.exchange.close()
        logger.info("ingest stopped", extra={"exchange": self.config.exchange})
        return self.counts

    async def _read(self, symbol: str) -> None:
        """Watch one symbol's trades until cancelled, reconnecting with backoff on errors."""
        import ccxt

        exchange, name = self.exchange, self.config.exchange
        failures = 0
        while True:
            try:
                trades = await exchange.watch_trades(symbol)
            except (ccxt.BadSymbol, ccxt.AuthenticationError, ccxt.NotSupported) as exc:
                raise ConfigError(f"{name} {symbol}: {exc}") from exc
            except ccxt.BaseError as exc:  # NetworkError and exchange errors: dial again
                failures += 1
                delay = min(
                    self.config.backoff_max_s, self.config.backoff_min_s * 2 ** (failures - 1)
                )
                delay *= 0.5 + random.random() / 2
                logger.warning(
                    "websocket error, reconnecting",
                    extra={"exchange": name, "symbol": symbol, "error": str(exc), "delay_s": delay},
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            waited = await self._queue(symbol, trades, time.time_ns())
            while waited:  # trades that came meanwhile wait in ccxt's cache: take them now
                newer = [t for t in cached_trades(exchange, symbol) if self._unseen(symbol, t)]
                waited = bool(newer) and await self._queue(symbol, newer, time.time_ns(), True)

    def _unseen(self, symbol: str, trade: dict[str, Any]) -> bool:
        """A cached trade with a numeric id above the last one queued (others are left)."""
        try:
            return int(trade.get("id")) > self.ids.last.get(symbol, -1)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    async def _queue(
        self, symbol: str, trades: list[dict[str, Any]], recv_ns: int, cached: bool = False
    ) -> bool:
        """Normalise, check and queue `trades`; True if the queue was full on the way."""
        name = self.config.exchange
        key = symbol.encode()
        waited = False
        for trade in trades:
            try:
                tick = normalise(trade, recv_ns, self.config.max_future_ns)
            except InvalidTick as exc:
                if id(trade) not in self.bad:  # read from the cache and handed over again
                    if len(self.bad) >= 4096:
                        self.bad.clear()
                    self.bad[id(trade)] = trade  # held, so its id is not reused meanwhile
                    self._malformed(f"{exc.reason}: {exc.detail}")
                continue
            skipped = self.ids.check(tick.symbol, tick.trade_id)
            if cached:
                self.ids.from_cache[tick.symbol] = int(tick.trade_id)
            if skipped is None:
                if int(tick.trade_id) > self.ids.from_cache.get(tick.symbol, -1):
                    self.counts.duplicates += 1  # not one taken from the cache before
                    DUPLICATES.labels(name, tick.symbol).inc()
                continue
            if skipped:
                self.counts.gaps += 1
                self.counts.missed += skipped
                GAPS.labels(name, tick.symbol).inc()
                MISSED.labels(name, tick.symbol).inc(skipped)
                logger.warning(
                    "trade id gap",
                    extra={"exchange": name, "symbol": tick.symbol, "missed": skipped},
                )
            LAG.labels(name).observe((recv_ns - tick.event_ns) / 1e9)
            if self.queue.full():
                waited = True
                self.counts.queue_full += 1
                QUEUE_FULL.labels(name).inc()
            await self.queue.put((key, tick.encode()))
            self.counts.queued += 1
            TICKS.labels(name, tick.symbol).inc()
        return waited

    async def _publish(self, producer: Any, flush_every: int = 1000) -> None:
        """Send queued ticks until None comes; await acks every `flush_every` or when idle."""
        pending: list[asyncio.Future[Any]] = []
        topic = self.config.topic
        try:
            while True:
                item = await self.queue.get()
                if item is not None:
                    key, value = item
                    pending.append(await producer.send(topic, value, key=key))
                if pending and (item is None or len(pending) >= flush_every or self.queue.empty()):
                    await asyncio.gather(*pending)
                    self.counts.published += len(pending)
                    pending.clear()
                if item is None:
                    return
        except KafkaError as exc:
            message = f"publishing ticks failed after {self.counts.published} were acknowledged"
            raise BrokerError(f"{message}: {exc}", topic=topic) from exc


def parse_symbols(text: str) -> tuple[str, ...]:
    """`BTC/USDT,ETH/USDT` -> ('BTC/USDT', 'ETH/USDT'); ConfigError if one is not BASE/QUOTE."""
    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in symbols if s.count("/") != 1 or s.startswith("/") or s.endswith("/")]
    if bad or not symbols:
        raise ConfigError(f"--symbols takes BASE/QUOTE pairs separated by commas, got {text!r}")
    return symbols
