"""MLflow's artifact store unreachable while the champion alias moves: the old version serves on."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import mlflow.artifacts
import orjson
import pytest
from mlflow.exceptions import MlflowException

from features.spec import FeatureSpec
from inference.registry import open_client
from inference.testing import golden_for, make_onnx_classifier, register_version
from inference.watcher import POLL_ERRORS, REJECTIONS, ModelWatcher
from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, market
from tests.helpers import Pipeline, fresh, run, unique

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]
N_FEATURES = FeatureSpec().n_features


def test_artifact_store_unreachable_during_a_swap(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap waits for the store: v1 serves throughout the outage, v2 once it is back."""
    settings = fresh(
        pipeline.settings,
        model_name=unique("faults-swap"),
        model_poll_s=0.2,
        prefer_gpu=False,
        max_batch=500,
        # no kernel compiler: its child process would hold back the first poll for
        # minutes on a loaded machine (the watcher starts it before polling)
        numba_kernels=False,
    )
    uri, name = settings.mlflow_uri, settings.model_name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # register_version sets it; restored after
    versions = []
    for seed in (1, 2):
        model = make_onnx_classifier(N_FEATURES, "logistic", seed=seed)
        versions.append(
            register_version(
                uri, name, model, settings.feature_spec.hash, golden_for(model, N_FEATURES)
            )
        )
    client = open_client(uri)
    client.set_registered_model_alias(name, "champion", versions[0])
    outage = _ArtifactOutage()
    # the store's listing call fails as MLflow's does when its artifact store (S3, an
    # HTTP proxy) does not answer; the tracking database stays up, as it does then
    monkeypatch.setattr(mlflow.artifacts, "list_artifacts", outage.list_artifacts)

    ticks = market(pipeline, 40_000)
    worker = InProcess(settings)
    batcher, watcher = worker.service.batcher, worker.service.watcher
    try:
        worker.wait_assigned()
        publisher = Publisher(settings, ticks, rate=500)
        time.sleep(1.0)
        tried = _attempts(watcher)
        outage.down = True  # the artifact store stops answering ...
        try:
            client.set_registered_model_alias(name, "champion", versions[1])  # ... mid-swap
            _wait(lambda: _attempts(watcher) > tried, "the watcher to try the new version")
            time.sleep(2.0)
            assert batcher.model.version == versions[0]  # the old version serves on
        finally:
            outage.down = False
        back = time.time()
        deadline = time.monotonic() + 20
        while batcher.model.version != versions[1] and time.monotonic() < deadline:
            time.sleep(0.1)
        swapped = batcher.model.version == versions[1]
        time.sleep(1.0)
        publisher.stopped.set()
        sent = publisher.join()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=back)
    finally:
        stopped = worker.stop()
    oracle.record(
        "MLflow artifact store unreachable during a swap",
        result,
        f"{sent:,} ticks at 500/s; v1 serving, alias moved to v2 while its "
        "artifacts could not be read, for about 2 s",
    )
    assert stopped
    result.check()
    served = run(oracle.read_log(settings.bootstrap, settings.signals_topic))
    by_version = Counter(orjson.loads(r.value or b"")["version"] for r in served)
    assert by_version[versions[0]] > 0, by_version
    assert swapped and by_version[versions[1]] > 0, (
        f"v{versions[1]} never served after the store came back: {by_version}"
    )


class _ArtifactOutage:
    """`mlflow.artifacts.list_artifacts`, raising MLflow's connection error while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.real = mlflow.artifacts.list_artifacts

    def list_artifacts(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise MlflowException("connection refused by the artifact store (injected outage)")
        return self.real(*args, **kwargs)


def _attempts(watcher: ModelWatcher) -> float:
    """Registry polls that failed plus versions rejected, so far (either means: tried)."""
    rejected = sum(
        s.value for m in REJECTIONS.collect() for s in m.samples if s.name.endswith("_total")
    )
    return float(POLL_ERRORS._value.get()) + rejected


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
