"""A signed MLflow webhook replayed against a served worker under load: refused, no extra swap."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from deploy.stack import free_port
from features.spec import FeatureSpec
from inference.registry import open_client
from inference.testing import golden_for, make_onnx_classifier, register_version
from inference.watcher import SWAPS
from inference.webhook import WEBHOOKS
from stream.contracts.signal import Signal
from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, market
from tests.helpers import Pipeline, fresh, run, unique

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]
N_FEATURES = FeatureSpec().n_features
SECRET = "whsec-faults-0123456789"
RATE = 500
POLL_S = 60.0  # the registry poll: far longer than the test's swaps take, so only a wake swaps


def _signed(name: str, version: str) -> tuple[bytes, dict[str, str]]:
    """An alias-moved delivery, body and headers exactly as MLflow's delivery code builds them."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps(
        {
            "entity": "model_version_alias",
            "action": "created",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "data": {"name": name, "alias": "champion", "version": version},
        }
    )
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _generate_hmac_signature(SECRET, delivery_id, timestamp, payload),
    }
    return payload.encode(), headers


def _count(metric: object, label: str) -> float:
    return float(metric.labels(label)._value.get())  # type: ignore[attr-defined]


def test_webhook_replay_under_load(pipeline: Pipeline) -> None:
    """One signed delivery swaps v1 for v2 at once; the same delivery again is refused (401)
    and wakes nothing, though the alias has moved back meanwhile."""
    settings = fresh(
        pipeline.settings,
        model_name=unique("faults-webhook"),
        model_poll_s=POLL_S,
        webhook_secret=SecretStr(SECRET),  # model_copy does not validate: typed here
        prefer_gpu=False,
        max_batch=500,
        numba_kernels=False,  # as tests/faults/test_registry.py: no compiler child process
        http_host="127.0.0.1",
        http_port=free_port(),
    )
    uri, name = settings.mlflow_uri, settings.model_name
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

    ticks = market(pipeline, 40_000)
    worker = InProcess(settings, http=True)
    batcher = worker.service.batcher
    port = settings.http_port
    url = f"http://127.0.0.1:{port}/webhooks/mlflow"
    try:
        worker.wait_assigned()
        _wait(lambda: _up(port), "the HTTP API")
        publisher = Publisher(settings, ticks, rate=RATE)
        _wait(lambda: worker.worker.processed > 1000, "v1 scoring (features filled)")
        swaps, replayed = _count(SWAPS, "champion"), _count(WEBHOOKS, "replayed")
        client.set_registered_model_alias(name, "champion", versions[1])
        body, headers = _signed(name, versions[1])
        first = httpx.post(url, content=body, headers=headers, timeout=10)
        sent_at = time.monotonic()
        _wait(lambda: batcher.model.version == versions[1], "the swap the webhook woke")
        swapped_s = time.monotonic() - sent_at
        # the alias moves back without a delivery: only a wake (or the poll, a minute
        # away) would swap again, so an accepted replay would show as a swap to v1
        client.set_registered_model_alias(name, "champion", versions[0])
        again = httpx.post(url, content=body, headers=headers, timeout=10)
        fault_end = time.time()
        time.sleep(3.0)  # a wake is answered within a poll's duration (~0.1 s): none comes
        still = batcher.model.version
        extra_swaps = _count(SWAPS, "champion") - swaps - 1
        publisher.stopped.set()
        sent = publisher.join()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=fault_end)
        signals = run(oracle.read_log(settings.bootstrap, settings.signals_topic))
        alive = worker.alive
    finally:
        stopped = worker.stop()
    oracle.record(
        "MLflow webhook replayed",
        result,
        f"{sent:,} ticks at {RATE}/s; a signed alias-moved delivery swapped v1 for v2 in "
        f"{swapped_s:.2f} s (registry poll {POLL_S:.0f} s); the same delivery again was "
        f"answered {again.status_code} and woke nothing",
    )
    print(f"account: {result}; first {first.status_code} swap {swapped_s:.2f} s; "
          f"replay {again.status_code} {again.text}")  # fmt: skip
    assert alive and stopped
    assert first.status_code == 200 and first.json()["status"] == "polling", first.text
    assert swapped_s < POLL_S / 4, swapped_s  # the delivery woke the watcher, not its poll
    assert again.status_code == 401 and "accepted already" in again.text, again.text
    assert _count(WEBHOOKS, "replayed") == replayed + 1
    assert still == versions[1] and extra_swaps == 0, (still, extra_swaps)
    result.check()
    assert result.signalled == sent, result
    scored = Counter(Signal.decode(r.value or b"").version for r in signals)  # type: ignore[attr-defined]
    assert scored[versions[0]] > 0 and scored[versions[1]] > 0, scored
    assert set(scored) <= {"", *versions}, scored


def _up(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except httpx.TransportError:
        return False
    return True


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
