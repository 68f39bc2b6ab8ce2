"""Session fixtures: the real local stack, started through the same code as `tickserve up`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.settings import Settings, load_settings
from deploy.stack import LocalStack, free_port
from stream.ingest.archive import ArchiverConfig, ClickHouseArchive, run_archiver
from stream.ingest.feed import publish, read_trades
from stream.kafka.clients import ensure_topics
from tests.helpers import HISTORY, TRADES, Pipeline, forbidden_imports, run, unique
from training.dataset import build_dataset
from training.train import train_and_register

TESTS = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """Fail loudly, never skip, when the shared data is missing or tests import each other.

    Shared helpers live in `tests/helpers.py`: a test module importing another test
    module (or this conftest) runs that module's code twice and hides what it needs.
    """
    if not TRADES.exists():
        raise pytest.UsageError(f"market data not found at {TRADES} (shared/ must sit beside main)")
    for path in sorted(TESTS.glob("test_*.py")):
        imported = forbidden_imports(path)
        if imported:
            names = ", ".join(imported)
            raise pytest.UsageError(f"{path.name} imports {names}: share it from tests/helpers.py")


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Each test leaves os.environ as it found it.

    MLflow's set_tracking_uri writes MLFLOW_TRACKING_URI into os.environ, where every
    process a later test starts (workers, `make weekly`) would find this test's registry.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A running local stack on free ports in a temporary state dir (REDIS_URL honoured).

    Without the monitor: tests that need it start their own (tests/test_monitor.py).
    """
    state = tmp_path_factory.mktemp("tickserve-state")
    settings = load_settings(
        state_dir=state,
        broker_port=free_port(),
        valkey_port=free_port(),
        http_port=0,
        monitor_http_port=0,
    )
    stack = LocalStack(settings)
    try:
        stack.up()
        yield settings
    finally:
        stack.down()


@pytest.fixture
def topics(stack_settings: Settings) -> Settings:
    """Settings with fresh topic and group names for one test."""
    return stack_settings.model_copy(
        update={
            "ticks_topic": unique("ticks"),
            "signals_topic": unique("signals"),
            "dlq_topic": unique("dlq"),
            "group_id": unique("worker"),
            "archive_group_id": unique("archive"),
        }
    )


@pytest.fixture(scope="session")
def pipeline(stack_settings: Settings) -> Pipeline:
    """History published and archived, a model trained on the archive and registered."""
    settings = stack_settings.model_copy(
        update={
            "ticks_topic": unique("ticks"),
            "signals_topic": unique("signals"),
            "dlq_topic": unique("dlq"),
            "group_id": unique("worker"),
            "archive_group_id": unique("archive"),
            "model_name": unique("tickserve-test"),
        }
    )
    ticks = read_trades(TRADES)
    topics = [settings.ticks_topic, settings.signals_topic, settings.dlq_topic]
    run(ensure_topics(settings.bootstrap, topics, settings.partitions))
    assert run(publish(ticks[:HISTORY], settings.bootstrap, settings.ticks_topic)) == HISTORY

    archive = ClickHouseArchive.open(settings.clickhouse)
    config = ArchiverConfig(settings.bootstrap, settings.ticks_topic, settings.archive_group_id)
    inserted = run(run_archiver(archive, config, asyncio.Event(), idle_exit_s=2.0))
    assert inserted == HISTORY
    spec = settings.feature_spec
    frame = archive.read_ticks(["XRP/ETH"])
    assert len(frame) >= HISTORY  # other tests may archive the same real trades (deduplicated)
    frame = frame[frame["event_ns"] <= ticks[HISTORY - 1]["event_ns"]]
    result = train_and_register(build_dataset(frame, spec), spec, settings.mlflow_uri,
                                settings.model_name)  # fmt: skip
    return Pipeline(settings, result, ticks)
