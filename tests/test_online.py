"""The online store through Feast: last write wins by event time, visible from another
process, and a Redis outage costs retries, not the worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from deploy.settings import Settings
from deploy.stack import LocalStack, free_port
from features.online import OnlineWriter, open_store, read_online
from features.spec import FeatureSpec
from tests.helpers import unique

pytestmark = pytest.mark.services
SPEC = FeatureSpec()
ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_123_456_000


def _rows(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, SPEC.n_features), value)


def test_two_updates_inside_one_second_both_land_in_order(stack_settings: Settings) -> None:
    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    writer = OnlineWriter(store, SPEC)
    symbol = unique("SYM")
    writer.offer([symbol], np.array([T0]), _rows(1.0))
    writer.flush()
    writer.offer([symbol], np.array([T0 + 250_000_000]), _rows(2.0))  # 0.25 s later
    writer.flush()
    got = read_online(store, [symbol], SPEC)[list(SPEC.names)].to_numpy()[0]
    assert got.tolist() == [2.0] * SPEC.n_features
    # an older row arriving late must not overwrite the newer one
    writer.offer([symbol], np.array([T0 + 100_000_000]), _rows(3.0))
    writer.flush()
    got = read_online(store, [symbol], SPEC)[list(SPEC.names)].to_numpy()[0]
    assert got.tolist() == [2.0] * SPEC.n_features


def test_coalescing_keeps_the_newest_row_per_symbol(stack_settings: Settings) -> None:
    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    writer = OnlineWriter(store, SPEC)
    a, b = unique("A"), unique("B")
    writer.offer([a, b, a], np.array([T0, T0, T0 + 5]), np.vstack([_rows(1), _rows(7), _rows(2)]))
    writer.offer([a], np.array([T0 + 1]), _rows(9))  # older than the pending one: ignored
    writer.flush()
    assert writer.flushed_rows == 2  # writes scale with symbols, not ticks
    frame = read_online(store, [a, b], SPEC)
    assert frame[list(SPEC.names)].to_numpy()[:, 0].tolist() == [2.0, 7.0]


def test_another_process_reads_what_was_written(stack_settings: Settings) -> None:
    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    writer = OnlineWriter(store, SPEC)
    symbol = unique("XPROC")
    values = np.arange(SPEC.n_features, dtype=np.float64).reshape(1, -1) / 7
    writer.offer([symbol], np.array([T0]), values)
    writer.flush()
    code = (
        "import json, sys; from pathlib import Path\n"
        "from features.online import open_store, read_online\n"
        "from features.spec import FeatureSpec\n"
        "s = open_store(sys.argv[1], Path(sys.argv[2]))\n"
        "f = read_online(s, [sys.argv[3]], FeatureSpec())\n"
        "print(json.dumps(f[list(FeatureSpec().names)].to_numpy()[0].tolist()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, stack_settings.redis, str(stack_settings.feast_registry),
         symbol],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT,
    )  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1]) == values[0].tolist()


def _failures() -> float:
    return REGISTRY.get_sample_value("online_store_write_failures_total") or 0.0


def test_redis_outage_is_retried_and_converges(tmp_path: Path) -> None:
    """A Redis of its own, stopped under a running writer and started again."""
    settings = Settings(state_dir=tmp_path, valkey_port=free_port(), redis_url=None)
    stack = LocalStack(settings)
    stack.start_redis()
    try:
        store = open_store(settings.redis, settings.feast_registry)
        writer = OnlineWriter(store, SPEC, interval_s=0.02).start()
        writer.offer(["S"], np.array([T0]), _rows(1.0))
        deadline = time.monotonic() + 10
        while writer.flushed_rows < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stack.down()  # Redis gone
        before = _failures()
        started = time.monotonic()
        writer.offer(["S"], np.array([T0 + 1_000]), _rows(2.0))
        offered = time.monotonic() - started
        assert offered < 0.01  # offering never waits for Redis
        while _failures() <= before:
            assert time.monotonic() < deadline + 10, "no failed write was counted"
            time.sleep(0.02)
        stack.start_redis()  # back, empty: the pending row must still arrive
        deadline = time.monotonic() + 20
        while True:
            frame = read_online(store, ["S"], SPEC)
            if frame[SPEC.names[0]].iloc[0] == 2.0:
                break
            assert time.monotonic() < deadline, "writer did not converge after Redis came back"
            time.sleep(0.1)
        writer.close()
    finally:
        stack.down()


def test_rows_are_written_in_feasts_own_redis_layout(stack_settings: Settings) -> None:
    """Our Redis writer leaves exactly the hash that Feast's own online write leaves."""
    import redis
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    writer = OnlineWriter(store, SPEC)
    ours, feasts = unique("OURS"), unique("FEAST")
    special = [0.1, -0.0, 1e-300, -123456.789, 3.0]  # a signed zero, a tiny and a large one
    values = np.array([[special[i % len(special)] for i in range(SPEC.n_features)]])
    event_ns = np.array([T0 + 987])  # Feast keeps microseconds: the 987 ns are dropped
    writer.offer([ours], event_ns, values)
    writer.flush()
    assert writer._redis is not None, "the Redis layout writer was not chosen"
    writer.offer([feasts], event_ns, values)
    writer._write_through_feast(writer._take())

    client = redis.Redis.from_url(stack_settings.redis)
    hashes = []
    for symbol in (ours, feasts):
        entity = EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=symbol)])
        key = _redis_key(
            store.config.project, entity, store.config.entity_key_serialization_version
        )
        hashes.append(client.hgetall(key))
    assert hashes[0] and hashes[0] == hashes[1]
    frame = read_online(store, [ours, feasts], SPEC)
    assert frame[list(SPEC.names)].to_numpy().tolist() == [values[0].tolist()] * 2


def test_newer_wins_against_rows_feast_itself_wrote(stack_settings: Settings) -> None:
    """The check on the server reads the Timestamp that Feast's own write leaves."""
    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    writer = OnlineWriter(store, SPEC)
    symbol = unique("MIXED")
    writer.offer([unique("OTHER")], np.array([T0]), _rows(0.0))
    writer.flush()  # resolves the view that `_write_through_feast` writes to
    writer.offer([symbol], np.array([T0 + 1_000_000_000]), _rows(5.0))
    writer._write_through_feast(writer._take())  # Feast's write, one second later than T0
    for event_ns, value, expect in ((T0, 1.0, 5.0),  # older: refused
                                    (T0 + 1_000_000_000, 2.0, 5.0),  # the same instant
                                    (T0 + 1_000_001_000, 3.0, 3.0),  # 1 us newer
                                    (T0 + 2_000_000_000 - 1_000, 4.0, 4.0)):  # fmt: skip
        writer.offer([symbol], np.array([event_ns]), _rows(value))
        writer.flush()
        got = read_online(store, [symbol], SPEC)[list(SPEC.names)].to_numpy()[0]
        assert got.tolist() == [expect] * SPEC.n_features, (event_ns, value)


def test_ttl_and_skip_dedup_follow_the_store_config(stack_settings: Settings) -> None:
    import redis
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from features.feature_repo.definitions import FEATURE_VIEW
    from features.online import _RedisRows

    store = open_store(stack_settings.redis, stack_settings.feast_registry)
    config = store.config
    client = store.provider.online_store._get_client(config.online_store)
    rows = _RedisRows(client, config.project, FEATURE_VIEW, SPEC.names,
                      config.entity_key_serialization_version, ttl_s=600, dedup=False)  # fmt: skip
    symbol = unique("TTL")
    block = np.vstack([_rows(1.0), _rows(2.0)])
    assert rows.write({symbol: (T0 + 5_000, block, 0)}) == 1
    assert rows.write({symbol: (T0, block, 1)}) == 1  # older, but nothing is checked
    got = read_online(store, [symbol], SPEC)[list(SPEC.names)].to_numpy()[0]
    assert got.tolist() == [2.0] * SPEC.n_features
    entity = EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=symbol)])
    key = _redis_key(config.project, entity, config.entity_key_serialization_version)
    assert 0 < redis.Redis.from_url(stack_settings.redis).ttl(key) <= 600
