"""Hostile model versions under load: the champion alias moved to each; none ever serves."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from features.spec import FeatureSpec
from inference.registry import open_client
from inference.testing import (
    golden_for,
    make_onnx_classifier,
    poison_with_nan,
    register_version,
    with_ballast,
)
from inference.watcher import REJECTIONS
from stream.contracts.signal import Signal
from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, market
from tests.helpers import Pipeline, fresh, run, unique

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]
N_FEATURES = FeatureSpec().n_features
RATE = 500
WARMUP_BUDGET_MS = 10
# the huge version carries HUGE_MB of initializer against a MAX_MODEL_MB limit: well over
# it, yet small enough to log through MLflow in seconds
MAX_MODEL_MB = 16
HUGE_MB = 40


def _corrupt(uri: str, name: str, version: str) -> None:
    """Overwrite the version's stored ONNX file with bytes that are not a model."""
    where = open_client(uri).get_model_version_download_uri(name, version)
    assert where.startswith("file://"), where  # the local stack's artifacts are files
    path = Path(unquote(urlparse(where).path)) / "model.onnx"
    assert path.is_file(), path
    path.write_bytes(b"\x08\x07not an ONNX model" + bytes(range(256)) * 64)


def _rejected(reason: str) -> float:
    return float(REJECTIONS.labels("champion", reason)._value.get())


def test_hostile_model_versions_never_serve(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt file, the wrong width, NaN outputs, a slow warm-up, a huge file: each refused."""
    settings = fresh(
        pipeline.settings,
        model_name=unique("faults-models"),
        model_poll_s=0.2,
        prefer_gpu=False,
        max_batch=500,
        numba_kernels=False,  # as tests/faults/test_registry.py: no compiler child process
        # v1 (logistic) warms up in well under 1 ms, the 600-tree model in ~50 ms
        warmup_budget_ms=WARMUP_BUDGET_MS,
        max_model_mb=MAX_MODEL_MB,
    )
    uri, name, spec_hash = settings.mlflow_uri, settings.model_name, settings.feature_spec.hash
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # register_version sets it; restored after
    base = make_onnx_classifier(N_FEATURES, "logistic", seed=1)
    good = register_version(uri, name, base, spec_hash, golden_for(base, N_FEATURES))
    other = make_onnx_classifier(N_FEATURES, "logistic", seed=2)
    corrupt = register_version(uri, name, other, spec_hash, golden_for(other, N_FEATURES))
    _corrupt(uri, name, corrupt)
    wide = make_onnx_classifier(N_FEATURES + 5, "logistic", seed=3)
    slow = make_onnx_classifier(
        N_FEATURES, "hgb", seed=4, max_iter=600, max_leaf_nodes=127, early_stopping=False
    )
    bad = {  # expected rejection reason -> version
        "load": corrupt,
        "contract": register_version(uri, name, wide, spec_hash, golden_for(wide, N_FEATURES + 5)),
        "nonfinite": register_version(
            uri, name, poison_with_nan(base), spec_hash, golden_for(base, N_FEATURES)
        ),
        "warmup": register_version(uri, name, slow, spec_hash, golden_for(slow, N_FEATURES)),
        "size": register_version(  # its scores are v1's: only its size is wrong
            uri, name, with_ballast(base, HUGE_MB * 2**20), spec_hash, golden_for(base, N_FEATURES)
        ),
    }
    client = open_client(uri)
    client.set_registered_model_alias(name, "champion", good)

    ticks = market(pipeline, 40_000)
    worker = InProcess(settings)
    batcher = worker.service.batcher
    refused: dict[str, float] = {}
    serving: list[str] = []
    try:
        worker.wait_assigned()
        publisher = Publisher(settings, ticks, rate=RATE)
        _wait(lambda: worker.worker.processed > 200, "the first ticks")
        started = time.time()
        for reason, version in bad.items():
            before = _rejected(reason)
            client.set_registered_model_alias(name, "champion", version)
            _wait(lambda r=reason, b=before: _rejected(r) > b,  # type: ignore[misc]
                  f"rejection of v{version} ({reason})")  # fmt: skip
            refused[reason] = _rejected(reason) - before
            serving.append(batcher.model.version)
        client.set_registered_model_alias(name, "champion", good)  # the rollback
        fault_end = time.time()
        _wait(lambda: worker.worker.processed > 200 + RATE * 1.0, "ticks after the rollback")
        publisher.stopped.set()
        sent = publisher.join()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=fault_end)
        signals = run(oracle.read_log(settings.bootstrap, settings.signals_topic))
        alive = worker.alive
    finally:
        stopped = worker.stop()
    oracle.record(
        "Hostile model versions (corrupt, wrong width, NaN, slow warm-up, huge)",
        result,
        f"{sent:,} ticks at {RATE}/s; the champion alias moved in {fault_end - started:.1f} s "
        f"to a corrupt ONNX file, a model of {N_FEATURES + 5} inputs, an all-NaN model, "
        f"a 600-tree model over a {WARMUP_BUDGET_MS} ms warm-up budget and a {HUGE_MB} MB "
        f"model over a {MAX_MODEL_MB} MB limit, then back; each refused "
        "(model_rejections_total load, contract, nonfinite, warmup, size)",
    )
    print(f"account: {result}; refused {refused}; took {fault_end - started:.1f} s")
    assert alive and stopped
    result.check()
    assert result.signalled == sent, result
    assert refused == {reason: 1.0 for reason in bad}, refused  # each counted once
    assert serving == [good] * len(bad), serving
    docs = [Signal.decode(r.value or b"") for r in signals]  # type: ignore[attr-defined]
    scored = Counter((d.version, d.error) for d in docs if d.ready)
    assert scored and set(scored) == {(good, None)}, scored  # scored by v1 only, all finite
    assert {d.version for d in docs if not d.ready} <= {""}  # features still filling


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
