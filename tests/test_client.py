"""The strategy client: typed signals from the real broker, repeats dropped, filters, example."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from contextlib import aclosing
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from deploy.settings import Settings
from stream.contracts.signal import Signal, encode_signals
from stream.contracts.tick import Tick
from stream.kafka.clients import ensure_topics, make_producer, start_client
from tests.helpers import run
from tickserve.client import Repeats, SignalsConfig, signals, wanted

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[1]


def _signal(symbol: str, offset: int, score: float | None, version: str = "3") -> Signal:
    (raw,) = encode_signals([symbol], [f"t{offset}"], [offset], [offset], [offset % 2], [offset],
                            7, "m", version, [score], 0.5)  # fmt: skip
    return Signal.decode(raw)


def test_repeats_are_dropped_by_tick_partition_and_offset() -> None:
    repeats = Repeats()
    seen = [repeats.first_time(_signal("A", o, 0.7)) for o in (0, 2, 1, 3, 2, 4, 3, 5)]
    # partitions 0 (offsets 0, 2, 4) and 1 (1, 3, 5); the second 2 and the second 3 repeat
    assert seen == [True, True, True, True, False, True, False, True]
    assert repeats.dropped == 2


def test_filters() -> None:
    config = SignalsConfig("x", symbols=frozenset({"A"}), versions=frozenset({"3"}),
                           ready_only=True)  # fmt: skip
    assert wanted(config, _signal("A", 1, 0.7))
    assert not wanted(config, _signal("B", 1, 0.7))
    assert not wanted(config, _signal("A", 1, 0.7, version="4"))
    assert not wanted(config, _signal("A", 1, None))
    assert wanted(SignalsConfig("x"), _signal("B", 1, None))


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper", ROOT / "examples/paper_strategy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper"] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_strategy_trades_signals_from_the_broker(topics: Settings) -> None:
    """Ticks and signals on the real broker, with a repeat, a not-ready signal and a bad record."""
    prices = [100.0, 101.0, 99.0, 102.0, 102.5, 101.0]
    scores: list[float | None] = [None, 0.8, 0.2, 0.9, 0.1, 0.6]
    ticks = [Tick("BTC/USDT", i + 1, p, 1.0, "buy", f"t{i}", i + 1) for i, p in enumerate(prices)]
    values = encode_signals(["BTC/USDT"] * 6, [f"t{i}" for i in range(6)], list(range(1, 7)),
                            list(range(1, 7)), [0] * 6, list(range(6)), 9, "m", "3", scores,
                            0.5)  # fmt: skip
    # a worker crash repeats signals 2 and 3; a newer major version is skipped, not raised
    newer = orjson.dumps({**orjson.loads(values[0]), "schema_version": "2.0"})
    sent = [*values[:4], values[2], values[3], newer, *values[4:]]

    async def main() -> None:
        await ensure_topics(topics.bootstrap, [topics.ticks_topic, topics.signals_topic], 1)
        producer = make_producer(topics.bootstrap)
        await start_client(producer, topics.bootstrap)
        try:
            for tick in ticks:
                await producer.send(topics.ticks_topic, tick.encode(), key=b"BTC/USDT")
            for value in sent:
                await producer.send(topics.signals_topic, value, key=b"BTC/USDT")
            await producer.flush()
        finally:
            await producer.stop()

    run(main())
    paper = _example()
    config = SignalsConfig(topics.bootstrap, topic=topics.signals_topic, start="earliest")
    book = run(asyncio.wait_for(paper.paper_trade(config, topics.ticks_topic, 6), 60))
    # flat on the first (not ready); then long 101, short 99, long 102, short 102.5, long 101
    expected = (99.0 - 101.0) - (102.0 - 99.0) + (102.5 - 102.0) - (101.0 - 102.5)
    assert book.signals == 6
    assert book.pnl["BTC/USDT"] == pytest.approx(expected)
    assert book.position["BTC/USDT"] == 1


def test_a_group_shares_partitions_and_resumes_after_its_commit(topics: Settings) -> None:
    values = encode_signals([f"S{i % 3}" for i in range(40)], [str(i) for i in range(40)],
                            list(range(40)), list(range(40)), [i % 4 for i in range(40)],
                            list(range(40)), 9, "m", "3", [0.7] * 40, 0.5)  # fmt: skip

    async def take(n: int) -> list[Signal]:
        config = SignalsConfig(topics.bootstrap, group_id=topics.group_id,
                               topic=topics.signals_topic, start="earliest")  # fmt: skip
        out: list[Signal] = []
        async with aclosing(signals(config)) as stream:
            async for signal in stream:
                out.append(signal)
                if len(out) == n:
                    break
        return out

    async def main() -> tuple[list[Signal], list[Signal]]:
        await ensure_topics(topics.bootstrap, [topics.signals_topic], 1)
        producer = make_producer(topics.bootstrap)
        await start_client(producer, topics.bootstrap)
        for value in values:
            await producer.send(topics.signals_topic, value, key=b"k")
        await producer.flush()
        await producer.stop()
        first = await asyncio.wait_for(take(25), 60)
        return first, await asyncio.wait_for(take(15), 60)

    first, second = run(main())  # type: ignore[misc]
    assert [s.trade_id for s in first + second] == [str(i) for i in range(40)]
