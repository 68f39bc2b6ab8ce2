"""The published record schemas: what the worker writes validates, readers stay compatible."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch
from jsonschema import Draft202012Validator

from stream.contracts.schema import NAMES, VERSIONS, breaking_changes, load
from stream.contracts.signal import SCHEMA_VERSION, Signal, encode_signals
from stream.contracts.tick import Tick
from stream.kafka.signalbatch import encode_signal_batches
from tickserve.errors import UnsupportedSchema

PUBLISHED = Path(__file__).parent / "data" / "schemas"


def _validator(name: str) -> Draft202012Validator:
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_every_kind_of_signal_the_worker_writes_validates() -> None:
    rng = np.random.default_rng(5)
    n = 300
    symbols = [f"SYN{i % 7}/USD" for i in range(n)]
    text = b"".join(s.encode() for s in symbols)
    lens = np.array([len(s) for s in symbols], np.int64)
    starts = np.cumsum(lens) - lens
    scores = rng.random(n)
    ready = rng.random(n) > 0.2
    scores[~ready] = np.nan
    scores[ready & (rng.random(n) < 0.1)] = np.nan  # model errors
    batches = encode_signal_batches(
        np.frombuffer(text, np.uint8), sym_start=starts, sym_len=lens, key_start=starts,
        key_len=lens, tid_start=starts, tid_len=lens, event_ns=np.arange(n) + 10**18,
        recv_ns=np.arange(n) + 10**18, tick_partition=np.arange(n) % 4,
        tick_offset=np.arange(n) * 3, emit_ns=10**18, model="m", version="3", scores=scores,
        threshold=0.5, partition=np.arange(n) % 4, ready=ready, timestamp_ms=1,
    )  # fmt: skip
    validator = _validator("signal")
    values = [r.value for _, data, _ in batches for r in DefaultRecordBatch(data)]
    kinds = set()
    for value in values:
        doc = orjson.loads(value)
        validator.validate(doc)
        kinds.add((doc["ready"], doc.get("error")))
    assert len(values) == n
    assert kinds == {(True, None), (False, None), (True, "non_finite")}


def test_a_schema_violation_is_caught() -> None:
    (value,) = encode_signals(["A"], ["1"], [1], [2], [0], [5], 3, "m", "4", [0.7], 0.5)
    doc = orjson.loads(value)
    validator = _validator("signal")
    validator.validate(doc)
    for bad in ({**doc, "direction": 2}, {**doc, "ready": False}, {**doc, "offset": -1}):
        assert list(validator.iter_errors(bad))


def test_ticks_validate() -> None:
    validator = _validator("tick")
    validator.validate(orjson.loads(Tick("BTC/USDT", 1, 2.5, 0.0, "sell", "9", 3).encode()))
    assert list(validator.iter_errors({"symbol": "A" * 65, "price": 0}))


def test_an_added_field_still_decodes_and_a_newer_major_is_refused() -> None:
    (value,) = encode_signals(["A"], ["1"], [1], [2], [0], [5], 3, "m", "4", [0.7], 0.5)
    doc = orjson.loads(value)
    newer_minor = {**doc, "schema_version": "1.7", "venue": "binance", "confidence": 0.9}
    decoded = Signal.decode(orjson.dumps(newer_minor))
    assert decoded == dataclasses.replace(Signal.decode(value), schema_version="1.7")
    assert Signal.decode(value).schema_version == SCHEMA_VERSION
    with pytest.raises(UnsupportedSchema, match="major 1"):
        Signal.decode(orjson.dumps({**doc, "schema_version": "2.0"}))


@pytest.mark.parametrize("name", NAMES)
def test_the_current_schema_keeps_every_published_one_of_its_major(name: str) -> None:
    """A change that would break consumers of the published schema needs a new major."""
    published = json.loads((PUBLISHED / f"{name}-{VERSIONS[name]}.published.json").read_text())
    assert breaking_changes(published, load(name)) == []


def test_breaking_changes_are_named() -> None:
    published = json.loads((PUBLISHED / "signal-1.0.published.json").read_text())
    changed = copy.deepcopy(published)
    del changed["properties"]["offset"]
    changed["properties"]["score"]["type"] = "number"
    changed["properties"]["direction"]["enum"] = [-1, 0, 1, 2]
    changed["required"].append("venue")
    changed["properties"]["venue"] = {"type": "string"}
    assert breaking_changes(published, changed) == [
        "offset: removed",
        "score: type changed",
        "direction: enum widened (old readers do not know the new values)",
        "venue: newly required",
    ]
    compatible = copy.deepcopy(published)
    compatible["properties"]["venue"] = {"type": "string"}
    assert breaking_changes(published, compatible) == []
