"""Hostile producers: every kind of bad record in one stream; more symbols than a worker holds."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream.ingest.feed import publish
from stream.kafka.clients import make_producer
from tests.faults import oracle
from tests.faults.harness import InProcess, market
from tests.helpers import Pipeline, fresh, run

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

REASONS = {"decode", "schema", "price", "quantity", "side", "future"}


def _hostile(now: int) -> tuple[list[tuple[str, bytes | None, bytes | None]], int]:
    """(kind, key, value) of every kind of record, and how many of them are valid ticks.

    The valid ones are edge cases the contract allows; each has a symbol of its own
    with rising event times, so that none is late.
    """
    step = iter(range(1, 1_000_000))

    def tick(name: str, **over: Any) -> dict[str, Any]:
        doc = {
            "symbol": name,
            "event_ns": now - 10_000_000_000 + next(step) * 1000,
            "price": 1.5,
            "quantity": 2.0,
            "side": "buy",
            "trade_id": f"h{next(step)}",
            "recv_ns": now,
        }
        doc.update(over)
        return {k: v for k, v in doc.items() if v is not _DROP}

    def bad(kind: str, **over: Any) -> tuple[str, bytes, bytes]:
        # the standard library writes what orjson refuses to (integers past 64 bits)
        return kind, b"BAD/1", json.dumps(tick("BAD/1", **over), separators=(",", ":")).encode()

    good = tick("BAD/1")
    text = orjson.dumps(good)
    invalid: list[tuple[str, bytes | None, bytes | None]] = [
        ("null value", b"BAD/1", None),
        ("empty value", b"BAD/1", b""),
        ("not JSON", b"BAD/1", b"{not json"),
        ("JSON array", b"BAD/1", b"[1, 2]"),
        ("JSON string", b"BAD/1", b'"tick"'),
        ("JSON number", b"BAD/1", b"42"),
        ("JSON null", b"BAD/1", b"null"),
        ("invalid UTF-8", b"BAD/1", text.replace(b"BAD/1", b"BAD\xff\xfe")),
        ("trailing bytes", b"BAD/1", text + b"xyz"),
        ("byte-order mark", b"BAD/1", b"\xef\xbb\xbf" + text),
        ("deep nesting", b"BAD/1", b"[" * 5000 + b"]" * 5000),
        ("NaN price", b"BAD/1", text.replace(b'"price":1.5', b'"price":NaN')),
        ("Infinity price", b"BAD/1", text.replace(b'"price":1.5', b'"price":Infinity')),
        ("price 1e400", b"BAD/1", text.replace(b'"price":1.5', b'"price":1e400')),
        ("duplicate key", b"BAD/1", text.replace(b'"price":1.5', b'"price":1.5,"price":-1')),
        bad("no symbol", symbol=_DROP),
        bad("empty symbol", symbol=""),
        bad("numeric symbol", symbol=7),
        bad("object symbol", symbol={"a": 1}),
        bad("symbol of 65 characters", symbol="S" * 65),
        bad("symbol of 10,000 characters", symbol="S" * 10_000),
        bad("no event_ns", event_ns=_DROP),
        bad("float event_ns", event_ns=1.5),
        bad("string event_ns", event_ns="1"),
        bad("event_ns past int64", event_ns=2**64),
        bad("event_ns an hour ahead", event_ns=now + 3600 * 10**9),
        bad("no recv_ns", recv_ns=_DROP),
        bad("zero price", price=0),
        bad("negative price", price=-1.0),
        bad("string price", price="1.5"),
        bad("boolean price", price=True),
        bad("null price", price=None),
        bad("negative quantity", quantity=-1.0),
        bad("no quantity", quantity=_DROP),
        bad("side hold", side="hold"),
        bad("side BUY", side="BUY"),
        bad("no side", side=_DROP),
        bad("no trade_id", trade_id=_DROP),
        bad("float trade_id", trade_id=1.5),
        bad("boolean trade_id", trade_id=True),
        bad("null trade_id", trade_id=None),
    ]
    valid = [
        ("integer price", b"OK/1", orjson.dumps(tick("OK/1", price=2))),
        ("integer trade_id", b"OK/2", orjson.dumps(tick("OK/2", trade_id=42))),
        ("extra fields", b"OK/3", orjson.dumps(tick("OK/3", venue="x", pad="y" * 2000))),
        ("unicode symbol", "ÉTH/€".encode(), orjson.dumps(tick("ÉTH/€"))),
        ("escaped trade_id", b"OK/4", orjson.dumps(tick("OK/4", trade_id='a"b\\c\u00e9'))),
        ("no key", None, orjson.dumps(tick("OK/5"))),
        ("pretty-printed", b"OK/6", orjson.dumps(tick("OK/6"), option=orjson.OPT_INDENT_2)),
        ("fields reordered", b"OK/7", orjson.dumps(dict(reversed(tick("OK/7").items())))),
        ("price 1e308", b"OK/8", orjson.dumps(tick("OK/8", price=1e308))),
        ("symbol of 64 characters", b"S" * 64, orjson.dumps(tick("S" * 64))),
    ]
    return [*invalid, *valid], len(valid)


_DROP = object()


async def _produce(
    bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        acks = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def test_every_kind_of_hostile_record_in_one_stream(pipeline: Pipeline, tmp_path: Path) -> None:
    settings = fresh(pipeline.settings, max_batch=500)
    ticks = market(pipeline, 2000)
    worker = InProcess(settings)
    try:
        run(publish(ticks[:1000], settings.bootstrap, settings.ticks_topic))
        kinds, n_valid = _hostile(time.time_ns())
        rounds = 10  # every kind ten times, between the market's ticks
        run(
            _produce(
                settings.bootstrap,
                settings.ticks_topic,
                [(key, value) for _ in range(rounds) for _, key, value in kinds],
            )
        )
        run(publish(ticks[1000:], settings.bootstrap, settings.ticks_topic))
        total = len(ticks) + rounds * len(kinds)
        result = oracle.answered(settings, expect_ticks=total)
        alive = worker.alive
    finally:
        stopped = worker.stop()
    oracle.record(
        f"{len(kinds)} kinds of hostile record in one stream",
        result,
        f"{rounds} of each kind ({len(kinds) - n_valid} bad, {n_valid} valid edge "
        f"cases) among {len(ticks):,} market ticks",
    )
    assert alive and stopped
    result.check()
    assert result.signalled == len(ticks) + rounds * n_valid
    assert result.dead_lettered == rounds * (len(kinds) - n_valid)
    assert set(result.reasons) <= REASONS, result.reasons


def test_ten_thousand_new_symbols_past_max_symbols(pipeline: Pipeline, tmp_path: Path) -> None:
    """Symbols past `max_symbols` are dead-lettered (capacity); known ones keep their signals."""
    limit = 2000
    settings = fresh(pipeline.settings, max_batch=500, max_symbols=limit)
    ticks = market(pipeline, 2000)
    now = time.time_ns()
    flood = [
        {
            "symbol": f"NEW{i}/X",
            "event_ns": now - 1000,
            "price": 1.0,
            "quantity": 1.0,
            "side": "sell",
            "trade_id": f"n{i}",
        }
        for i in range(10_000)
    ]
    worker = InProcess(settings)
    try:
        run(publish(ticks[:1000], settings.bootstrap, settings.ticks_topic))
        worker.wait_assigned()
        # the 4 market symbols are held before the flood: answered, not merely published
        # (a worker that meets both in one fetch admits symbols in the order it reads them,
        # partition by partition, and the flood's could take every slot first)
        oracle.answered(settings, expect_ticks=1000).check()
        run(publish(flood, settings.bootstrap, settings.ticks_topic))
        run(publish(ticks[1000:], settings.bootstrap, settings.ticks_topic))
        result = oracle.answered(settings, expect_ticks=len(ticks) + len(flood))
        alive = worker.alive
    finally:
        stopped = worker.stop()
    oracle.record(
        "10,000 new symbols past max_symbols",
        result,
        f"max_symbols={limit}; 2,000 ticks of 4 known symbols around the flood",
    )
    assert alive and stopped
    result.check()
    over = len(flood) - (limit - 4)
    held = worker.worker.engine.symbols
    assert result.reasons == {"capacity": over}, (len(held), held[:10], held[-10:])
    assert result.signalled == len(ticks) + len(flood) - over
