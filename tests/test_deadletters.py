"""Dead letters carry the record as it arrived and where from; shadow scores go apart."""

from __future__ import annotations

import asyncio

import numpy as np

from inference.batcher import BatchScores
from inference.testing import loaded, make_onnx_classifier
from stream.contracts.tick import Rejected, Tick
from stream.contracts.tickcodec import decode_columns
from stream.kafka.testing import FakeSink, fetched_of
from stream.worker.deadletters import DeadLetters
from stream.worker.shadow import ShadowSignals


def test_dead_letters_keep_the_record_and_say_why_and_where() -> None:
    async def main() -> None:
        sink = FakeSink()
        fetched = fetched_of("ticks", [(2, 41, b"A", b"not json"), (2, 42, b"A", b"late one")])
        letters = DeadLetters(sink, "ticks.dlq")
        picked = letters.select(
            np.array([1]),
            np.array([True]),
            np.array([False]),
            [Rejected(0, "decode", "x" * 5000)],
            None,
        )
        assert [(r, reason) for r, reason, _ in picked] == [(1, "late"), (0, "decode")]
        acks = [await letters.send(fetched, *one) for one in picked]
        await asyncio.gather(*acks)
        late, bad = sink.records
        assert (late.topic, late.key, late.value) == ("ticks.dlq", b"A", b"late one")
        assert late.headers["reason"] == b"late"
        assert late.headers["source"] == b"ticks/2/42"
        assert bad.headers["reason"] == b"decode" and len(bad.headers["detail"]) == 1000

    asyncio.run(main())


def test_replayed_records_are_not_dead_lettered_again() -> None:
    letters = DeadLetters(FakeSink(), "dlq")
    replayed = np.array([True, False])
    picked = letters.select(
        np.array([0, 1]),
        np.array([True, True]),
        np.array([False, False]),
        [Rejected(0, "schema", "")],
        replayed,
    )
    assert picked == [(1, "late", "older than the open bar")]


def test_the_challenger_scores_go_to_the_shadow_topic_only() -> None:
    async def main() -> None:
        ticks = [Tick("A", 1_000 + i, 1.0 + i, 1.0, "buy", f"t{i}", 5).encode() for i in range(3)]
        fetched = fetched_of("ticks", [(0, i, b"A", v) for i, v in enumerate(ticks)])
        spans, _ = decode_columns(
            fetched.buf, fetched.value_start, fetched.value_len, 10**19, 10**18
        )
        champion = loaded(make_onnx_classifier(4, "logistic", seed=1), 4, version="1")
        challenger = loaded(make_onnx_classifier(4, "logistic", seed=2), 4, version="2")
        ready = np.array([True, False, True])
        shadow = np.array([0.7, np.nan])
        scored = BatchScores(
            np.array([0.1, 0.2]), np.zeros(2, np.bool_), champion, shadow, challenger
        )
        sink = FakeSink()
        assert await ShadowSignals(sink, "", 0.5).send(spans, fetched, ready, scored, 9) == []
        acks = await ShadowSignals(sink, "shadow", 0.5).send(spans, fetched, ready, scored, 9)
        assert len(acks) == 1
        [record] = sink.records
        assert record.topic == "shadow" and record.key == b"A"
        assert b'"trade_id":"t0"' in record.value and b'"version":"2"' in record.value  # type: ignore[operator]

    asyncio.run(main())
