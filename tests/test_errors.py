"""Library errors become tickserve errors at the boundary, with context and the cause kept."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from aiokafka.errors import KafkaConnectionError, KafkaError
from clickhouse_connect.driver.exceptions import ClickHouseError
from mlflow.exceptions import MlflowException

from deploy.settings import Settings
from features.online import OnlineWriter, open_store, read_online
from features.snapshot import SnapshotStore
from features.spec import FeatureSpec
from inference.registry import VersionRef, fetch_version, open_client, resolve_alias
from stream.ingest.archive import ClickHouseArchive
from stream.ingest.feed import publish
from stream.kafka.clients import ensure_topics
from tests.helpers import TRADES, run, unique
from tickserve.errors import (
    ArchiveError,
    BrokerError,
    BrokerUnavailable,
    ModelNotFound,
    ModelRejected,
    OnlineStoreError,
    RegistryError,
    ServiceError,
    TickserveError,
)
from training.cost import month_cost
from training.dataset import build_dataset
from training.gate import evaluate_version
from training.params import SplitParams, TrainParams
from training.train import train_and_register

SPEC = FeatureSpec()


@pytest.fixture
def closed_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    """An empty MLflow store of this test's own."""
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture
def mlflow_globals() -> Iterator[None]:
    """Put back the global tracking and registry URIs a failing call left behind."""
    import mlflow

    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)


def test_the_tree_has_one_root_and_says_the_component() -> None:
    for error in (
        BrokerError("x", topic="t", partition=1, offset=7),
        BrokerUnavailable("h:1", "refused"),
        OnlineStoreError("x", key="k"),
        ArchiveError("x", table="ticks"),
        RegistryError("x", model="m", version="3"),
    ):
        assert isinstance(error, ServiceError) and isinstance(error, TickserveError)
        assert str(error).startswith(f"{error.component}: ")
    assert str(BrokerError("fetch failed", topic="t", partition=1, offset=7)) == (
        "broker: fetch failed (topic t, partition 1, offset 7)"
    )
    assert str(BrokerError("fetch failed", partition=0)) == "broker: fetch failed (partition 0)"
    assert str(RegistryError("gone", model="m", version="3")) == "registry: m v3: gone"
    assert str(ArchiveError("insert failed", table="ticks")) == (
        "archive: insert failed (table ticks)"
    )


def test_no_broker_at_the_bootstrap_address(closed_port: int) -> None:
    bootstrap = f"127.0.0.1:{closed_port}"
    with pytest.raises(BrokerUnavailable) as info:
        run(ensure_topics(bootstrap, ["ticks"], 1))
    error = info.value
    assert error.component == "broker" and error.bootstrap == bootstrap
    assert (error.topic, error.partition, error.offset) == (None, None, None)
    assert f"cannot reach the Kafka broker at {bootstrap}" in str(error)
    assert isinstance(error.__cause__, KafkaConnectionError)


@pytest.mark.services
def test_a_record_the_producer_refuses_names_the_topic(stack_settings: Settings) -> None:
    topic = unique("errors")
    run(ensure_topics(stack_settings.bootstrap, [topic], 1))
    too_large = {"raw": "x" * 2_000_000}  # over the producer's 1 MiB request limit
    with pytest.raises(BrokerError) as info:
        run(publish([too_large], stack_settings.bootstrap, topic))
    error = info.value
    assert error.component == "broker" and error.topic == topic
    assert f"(topic {topic})" in str(error)
    assert isinstance(error.__cause__, KafkaError)


def test_redis_not_there_for_the_online_store(closed_port: int, tmp_path: Path) -> None:
    store = open_store(f"redis://127.0.0.1:{closed_port}/0", tmp_path / "registry.db")
    with pytest.raises(OnlineStoreError) as info:
        read_online(store, ["S"], SPEC)
    assert info.value.component == "online-store"
    assert isinstance(info.value.__cause__, redis.ConnectionError)

    writer = OnlineWriter(store, SPEC)
    writer.offer(["S"], np.array([1_000]), np.zeros((1, SPEC.n_features)))
    with pytest.raises(OnlineStoreError) as info:
        writer.flush()
    assert info.value.component == "online-store" and info.value.key is None
    assert "writing 1 rows failed" in str(info.value)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert writer.flushed_rows == 0


def test_redis_not_there_for_snapshots_is_logged_translated(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots = SnapshotStore(f"redis://127.0.0.1:{closed_port}/0", "errors")
    with caplog.at_level(logging.WARNING, logger="features.snapshot"):
        assert snapshots.load("ticks", 0) is None  # the worker goes on without one
    snapshots.close()
    [record] = caplog.records
    assert record.getMessage() == "snapshot read failed"
    assert record.error.startswith("snapshots: snapshot read failed: ")  # type: ignore[attr-defined]
    assert record.error.endswith("(key errors:ticks:0)")  # type: ignore[attr-defined]


@pytest.mark.services
def test_a_statement_clickhouse_refuses_names_the_table(stack_settings: Settings) -> None:
    archive = ClickHouseArchive.open(stack_settings.clickhouse)
    with pytest.raises(ArchiveError) as info:
        archive.read_bars(0)  # intDiv by zero in ClickHouse
    error = info.value
    assert error.component == "archive" and error.table == "ticks"
    assert "Division by zero" in str(error)
    assert isinstance(error.__cause__, ClickHouseError)


def test_a_tracking_uri_mlflow_has_no_store_for() -> None:
    with pytest.raises(RegistryError) as info:
        open_client("nosuch://registry")
    assert info.value.component == "registry"
    assert "nosuch://registry" in str(info.value)
    assert isinstance(info.value.__cause__, MlflowException)

    with pytest.raises(RegistryError) as info:
        month_cost("nosuch://registry")
    assert isinstance(info.value.__cause__, MlflowException)


def test_a_missing_model_is_not_found_and_a_bad_version_is_rejected(sqlite_uri: str) -> None:
    with pytest.raises(ModelNotFound) as found:
        resolve_alias(open_client(sqlite_uri), "nosuch", "champion")
    assert isinstance(found.value.__cause__, MlflowException)

    with pytest.raises(ModelNotFound) as found:
        evaluate_version(sqlite_uri, "nosuch", "1")
    assert isinstance(found.value.__cause__, MlflowException)

    ref = VersionRef("nosuch", "7", "champion", SPEC.hash, run_id="")
    with pytest.raises(ModelRejected) as rejected:
        fetch_version(sqlite_uri, ref, SPEC, prefer_gpu=False)
    assert (rejected.value.reason, rejected.value.version) == ("download", "7")
    assert isinstance(rejected.value.__cause__, MlflowException)


@pytest.mark.usefixtures("mlflow_globals")
def test_registering_in_a_store_mlflow_cannot_open(tmp_path: Path) -> None:
    raw = pd.read_parquet(TRADES).head(40_000)
    ticks = pd.DataFrame(
        {
            "symbol": "XRP/ETH",
            "event_ns": raw["timestamp"].to_numpy(np.int64) * 1_000_000,
            "price": raw["price"],
            "quantity": raw["amount"],
            "is_buy": raw["side"] == "buy",
        }
    )
    dataset = build_dataset(ticks, SPEC)
    params = TrainParams(splits=SplitParams(n_folds=2))
    with pytest.raises(RegistryError) as info:
        train_and_register(dataset, SPEC, "nosuch://registry", "m", params=params)
    assert info.value.component == "registry" and info.value.model == "m"
    assert isinstance(info.value.__cause__, MlflowException)
