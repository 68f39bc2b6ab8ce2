"""The oracle itself: it tells lost, duplicated, conflicting and foreign outcomes apart."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.faults import oracle
from tests.faults.oracle import Logged, _Outcomes, _tally


def _tick(partition: int, offset: int, trade_id: str, ts_ms: int = 1000) -> Logged:
    value = orjson.dumps({"symbol": "A", "trade_id": trade_id, "price": 1.0})
    return Logged(partition, offset, ts_ms, value, {})


def _signal(tick: Logged, trade_id: str, ts_ms: int) -> Logged:
    doc = {"partition": tick.partition, "offset": tick.offset, "trade_id": trade_id}
    return Logged(0, 0, ts_ms, orjson.dumps(doc), {})


def _letter(tick: Logged, ts_ms: int, topic: str = "ticks", value: bytes | None = None) -> Logged:
    source = f"{topic}/{tick.partition}/{tick.offset}".encode()
    headers = {"source": source, "reason": b"schema"}
    return Logged(0, 0, ts_ms, tick.value if value is None else value, headers)


def test_every_tick_is_put_in_exactly_one_box() -> None:
    ticks = [_tick(0, i, f"t{i}") for i in range(8)]
    outcomes = _Outcomes("ticks")
    outcomes.add_signal(_signal(ticks[0], "t0", 1010))
    outcomes.add_signal(_signal(ticks[1], "t1", 1020))
    outcomes.add_signal(_signal(ticks[1], "t1", 4000))  # redelivered: a duplicate
    outcomes.add_letter(_letter(ticks[2], 1030))
    outcomes.add_signal(_signal(ticks[3], "t3", 1040))
    outcomes.add_letter(_letter(ticks[3], 1050))  # both kinds: a conflict
    outcomes.add_signal(_signal(ticks[4], "other", 1060))  # names another tick: foreign
    outcomes.add_letter(_letter(ticks[5], 1070, topic="elsewhere"))  # unreadable source
    outcomes.add_letter(_letter(ticks[6], 1080, value=b"changed"))  # not the record: foreign
    # ticks[7] has nothing: lost unless counted as dropped
    got = _tally([ticks], outcomes, set(), fault_end=1.015)
    assert (got.ticks, got.signalled, got.dead_lettered, got.dropped) == (8, 2, 1, 0)
    assert (got.lost, got.duplicates, got.conflicts, got.foreign) == (4, 1, 1, 3)
    assert got.lost_sample == [(0, 4), (0, 5), (0, 6), (0, 7)]
    assert got.reasons == {"schema": 2}  # the conflict's dead letter says why too
    assert got.recover_s == pytest.approx(1.040 - 1.015)  # the last first outcome after it
    with pytest.raises(AssertionError):
        got.check(max_duplicates=10)

    dropped = _tally([ticks], outcomes, {(0, 7)}, fault_end=None)
    assert (dropped.dropped, dropped.lost, dropped.recover_s) == (1, 3, None)


def test_a_clean_run_passes_and_duplicates_have_a_bound() -> None:
    ticks = [_tick(1, i, f"t{i}") for i in range(3)]
    outcomes = _Outcomes("ticks")
    for tick in ticks:
        outcomes.add_signal(_signal(tick, orjson.loads(tick.value or b"")["trade_id"], 2000))
    outcomes.add_signal(_signal(ticks[0], "t0", 2100))
    got = _tally([ticks], outcomes, set(), fault_end=None)
    got.check(max_duplicates=1)
    with pytest.raises(AssertionError):
        got.check()


def test_a_row_is_written_only_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    account = _tally([[_tick(0, 0, "t0")]], _Outcomes("ticks"), set(), None)
    monkeypatch.delenv(oracle.RESULTS_ENV, raising=False)
    oracle.record("Nothing written", account)
    monkeypatch.setenv(oracle.RESULTS_ENV, str(tmp_path))
    oracle.record("A fault, tried", account, "a note")
    [path] = list(tmp_path.iterdir())
    row = orjson.loads(path.read_bytes())
    assert path.name == "a-fault-tried.json"
    assert (row["fault"], row["note"], row["lost"]) == ("A fault, tried", "a note", 1)
