"""MLflow webhooks: signatures, replay window, filtering, the watcher's wake, a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from deploy.settings import load_settings
from deploy.stack import free_port
from features.spec import FeatureSpec
from inference.api import ApiContext, create_app, serve_http
from inference.batcher import BatcherConfig, MicroBatcher
from inference.testing import golden_for, loaded, make_onnx_classifier, register_version
from inference.watcher import ModelWatcher, WatcherConfig
from inference.webhook import WEBHOOKS, SeenDeliveries, WebhookConfig, signature
from tests.helpers import LoopThread
from tickserve.errors import WebhookRejected

SECRET = "whsec-test-0123456789"
NAME = "tickserve-test"
N = 4


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    return make_onnx_classifier(N, "logistic", seed=4)


class Wakes:
    """Counts `wake` calls, as the watcher would receive them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def wakes() -> Wakes:
    return Wakes()


def context(onnx_model: bytes, webhook: WebhookConfig | None) -> ApiContext:
    batcher = MicroBatcher(loaded(onnx_model, N, name=NAME), N, BatcherConfig(max_batch=4))
    return ApiContext(batcher, ("a", "b", "c", "d"), {}.get, lambda: True, webhook=webhook)


@pytest.fixture
def ctx(onnx_model: bytes, wakes: Wakes) -> ApiContext:
    config = WebhookConfig(SecretStr(SECRET), NAME, ("champion", "challenger"), wakes)
    return context(onnx_model, config)


def event(
    name: str = NAME, alias: str = "champion", action: str = "created", **more: Any
) -> dict[str, Any]:
    data = {"name": name, "alias": alias, **({"version": "2"} if action == "created" else {})}
    return {"entity": "model_version_alias", "action": action,
            "timestamp": "2026-01-01T00:00:00+00:00", "data": data, **more}  # fmt: skip


def signed(
    body: dict[str, Any] | bytes, secret: str = SECRET, at_s: float | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers exactly as MLflow's delivery code builds them."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = body.decode() if isinstance(body, bytes) else json.dumps(body)
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time() if at_s is None else at_s))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp, payload),
    }
    return payload.encode(), headers


def post(ctx: ApiContext, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/webhooks/mlflow", content=body, headers=headers)

    return asyncio.run(main())


def outcome(label: str) -> float:
    return float(WEBHOOKS.labels(label)._value.get())


def test_our_signature_is_mlflows() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps(event())
    assert signature(SECRET, "id-1", "1700000000", body.encode()) == _generate_hmac_signature(
        SECRET, "id-1", "1700000000", body
    )


@pytest.mark.parametrize(
    ("alias", "action"),
    [("champion", "created"), ("challenger", "created"), ("challenger", "deleted")],
)
def test_a_signed_change_of_our_alias_wakes_the_watcher(
    ctx: ApiContext, wakes: Wakes, alias: str, action: str
) -> None:
    before = outcome("polling")
    response = post(ctx, *signed(event(alias=alias, action=action)))
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "polling", "detail": f"{action} {alias}"}
    assert wakes.count == 1
    assert outcome("polling") == before + 1


def test_a_bad_signature_is_401_and_wakes_nothing(ctx: ApiContext, wakes: Wakes) -> None:
    before = outcome("bad_signature")
    body, headers = signed(event(), secret="someone-elses-secret")
    response = post(ctx, body, headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "signature does not match the configured secret"}

    body, headers = signed(event())
    tampered = body.replace(b'"version": "2"', b'"version": "3"')
    assert post(ctx, tampered, headers).status_code == 401
    headers["X-MLflow-Delivery-Id"] = str(uuid.uuid4())  # the id is signed too
    assert post(ctx, body, headers).status_code == 401
    assert wakes.count == 0
    assert outcome("bad_signature") == before + 3


def test_missing_headers_are_401(ctx: ApiContext, wakes: Wakes) -> None:
    body, headers = signed(event())
    for header in ("X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"):
        response = post(ctx, body, {k: v for k, v in headers.items() if k != header})
        assert response.status_code == 401
        assert "created with a secret" in response.json()["detail"]
    assert wakes.count == 0


@pytest.mark.parametrize("offset_s", [-301, -3600, 301])
def test_old_or_future_deliveries_are_refused_as_replays(
    ctx: ApiContext, wakes: Wakes, offset_s: int
) -> None:
    before = outcome("stale")
    response = post(ctx, *signed(event(), at_s=time.time() + offset_s))
    assert response.status_code == 401
    assert "more than 300 s" in response.json()["detail"]
    assert wakes.count == 0
    assert outcome("stale") == before + 1


def test_a_delivery_inside_the_window_is_accepted(ctx: ApiContext, wakes: Wakes) -> None:
    assert post(ctx, *signed(event(), at_s=time.time() - 290)).status_code == 200
    assert wakes.count == 1


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (event(name="another-model"), "model 'another-model' is not followed"),
        (event(alias="staging"), "alias 'staging' is not followed"),
        ({**event(), "entity": "model_version", "action": "created"}, "not an alias event"),
        ({**event(), "entity": "prompt_alias"}, "not an alias event"),
    ],
)
def test_other_models_aliases_and_events_are_ignored(
    ctx: ApiContext, wakes: Wakes, body: dict[str, Any], why: str
) -> None:
    before = outcome("ignored")
    response = post(ctx, *signed(body))
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert why in response.json()["detail"]
    assert wakes.count == 0
    assert outcome("ignored") == before + 1


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b"not json", json.dumps({**event(), "data": {"alias": "x"}}).encode()]
)
def test_a_signed_body_that_is_not_mlflows_is_400(
    ctx: ApiContext, wakes: Wakes, body: bytes
) -> None:
    response = post(ctx, *signed(body))
    assert response.status_code == 400
    assert response.json()["detail"]
    assert wakes.count == 0


def test_without_a_secret_every_delivery_is_refused(onnx_model: bytes) -> None:
    before = outcome("disabled")
    response = post(context(onnx_model, None), *signed(event()))
    assert response.status_code == 403
    assert "TICKSERVE_WEBHOOK_SECRET" in response.json()["detail"]
    assert outcome("disabled") == before + 1


def test_the_secret_setting_is_masked_and_empty_means_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TICKSERVE_WEBHOOK_SECRET", SECRET)
    settings = load_settings()
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    monkeypatch.setenv("TICKSERVE_WEBHOOK_SECRET", "")
    assert load_settings().webhook_secret is None


def test_openapi_documents_the_webhook(ctx: ApiContext) -> None:
    from openapi_spec_validator import validate as validate_openapi

    doc = create_app(ctx).openapi()
    validate_openapi(doc)
    hook = doc["paths"]["/webhooks/mlflow"]["post"]
    assert {"200", "400", "401", "403"} <= set(hook["responses"])
    schema = hook["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"entity", "action", "timestamp", "data"}
    headers = {p["name"] for p in hook["parameters"] if p["in"] == "header"}
    assert headers == {"x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"}


# -- ModelWatcher.wake ----------------------------------------------------------------


class GatedWatcher(ModelWatcher):
    """A watcher whose polls only count, and wait for `gate` while it is clear."""

    def __init__(self) -> None:
        super().__init__(
            WatcherConfig("sqlite:///unused.db", NAME, poll_interval_s=300), FeatureSpec()
        )
        self.started = 0
        self.finished = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def poll_once(self, batcher: MicroBatcher) -> None:
        self.started += 1
        await self.gate.wait()
        self.finished += 1


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_wake_polls_at_once_and_a_wake_during_a_poll_polls_once_more() -> None:
    async def main() -> None:
        watcher, stop = GatedWatcher(), asyncio.Event()
        running = asyncio.create_task(watcher.run(None, stop))  # type: ignore[arg-type]
        await _until(lambda: watcher.finished == 1)  # the first poll is immediate
        await asyncio.sleep(0.05)
        assert watcher.started == 1  # then it waits for the interval (300 s)

        watcher.wake()
        await _until(lambda: watcher.finished == 2)

        watcher.gate.clear()
        watcher.wake()
        await _until(lambda: watcher.started == 3)
        watcher.wake()  # during the poll: the alias may have moved after it read it
        watcher.wake()  # wakes between two polls count as one
        watcher.gate.set()
        await _until(lambda: watcher.finished == 4)
        await asyncio.sleep(0.05)
        assert (watcher.started, watcher.finished) == (4, 4)

        stop.set()  # a long interval does not delay shutdown
        await asyncio.wait_for(running, 1.0)

    asyncio.run(main())


# -- a real MLflow tracking server delivering to a real worker --------------------------


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on sqlite, allowed to deliver webhooks to 127.0.0.1 over http."""
    from cryptography.fernet import Fernet

    port = free_port()
    env = {
        **os.environ,
        # local deliveries: plain http to a loopback address (both refused by default)
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # without it each server process encrypts webhook secrets with a random key
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        # the server caches each event's webhook list for 60 s: the alias set before the
        # webhook existed would hide it from the alias move that follows
        "MLFLOW_WEBHOOK_CACHE_TTL": "0",
        # not needed here, and its job runner starts eight more processes
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = tmp_path / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
             "--artifacts-destination", str(tmp_path / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # imports alone take 10-30 s on a small machine
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class CountingWatcher(ModelWatcher):
    """The real watcher, counting the polls it has finished."""

    polls = 0

    async def poll_once(self, batcher: MicroBatcher) -> None:
        await super().poll_once(batcher)
        self.polls += 1


@pytest.mark.services
def test_an_alias_moved_on_the_server_serves_long_before_the_next_poll(
    mlflow_server: str,
) -> None:
    from mlflow import MlflowClient

    spec = FeatureSpec()
    name = f"webhook-{uuid.uuid4().hex[:8]}"
    models = [make_onnx_classifier(spec.n_features, "logistic", seed=s) for s in (1, 2)]
    first, second = (
        register_version(mlflow_server, name, m, spec.hash, golden_for(m, spec.n_features),
                         alias="champion" if i == 0 else None)
        for i, m in enumerate(models)
    )  # fmt: skip
    watcher = CountingWatcher(
        WatcherConfig(mlflow_server, name, poll_interval_s=300, prefer_gpu=False), spec
    )
    batcher = MicroBatcher(watcher.load_initial(), spec.n_features, BatcherConfig(max_batch=64))
    port = free_port()
    hook = WebhookConfig(SecretStr(SECRET), name, ("champion",), watcher.wake)
    app = create_app(ApiContext(batcher, spec.names, {}.get, lambda: True, webhook=hook))
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_event()).result(5)  # type: ignore[attr-defined]
    serving = loop.submit(serve_http(app, "127.0.0.1", port, stop))
    watching = loop.submit(watcher.run(batcher, stop))
    client = MlflowClient(tracking_uri=mlflow_server)
    try:
        webhook = client.create_webhook(
            name="tickserve", url=f"http://127.0.0.1:{port}/webhooks/mlflow",
            events=["model_version_alias.created", "model_version_alias.deleted"], secret=SECRET,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while watcher.polls < 1:  # the first poll (at start) has seen the first version
            assert time.monotonic() < deadline, "the watcher did not poll"
            time.sleep(0.01)
        # the server's own test delivery: an example model, so verified and ignored
        probe = client.test_webhook(webhook.webhook_id)
        assert probe.success, probe
        assert json.loads(probe.response_body)["status"] == "ignored"

        polling = outcome("polling")
        moved_at = time.monotonic()
        client.set_registered_model_alias(name, "champion", second)
        while batcher.model.version != second:
            assert time.monotonic() - moved_at < 15, f"v{second} not served; polls={watcher.polls}"
            time.sleep(0.01)
        took_s = time.monotonic() - moved_at
        assert batcher.model.version == second != first
        assert [(e.role, e.version, e.previous) for e in watcher.history] == [
            ("champion", second, first)
        ]
        assert watcher.polls == 2 and outcome("polling") == polling + 1
        assert took_s < 15  # the poll interval is 300 s
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        serving.result(10)  # type: ignore[attr-defined]
        watching.result(10)  # type: ignore[attr-defined]
        loop.close()


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_a_delivery_replayed_inside_the_window_is_refused(ctx: ApiContext, wakes: Wakes) -> None:
    body, headers = signed(event())
    assert post(ctx, body, headers).status_code == 200
    before = outcome("replayed")
    again = post(ctx, body, headers)  # captured and sent again, signature still valid
    assert again.status_code == 401 and "accepted already" in again.text
    assert wakes.count == 1
    assert outcome("replayed") == before + 1
    assert post(ctx, *signed(event())).status_code == 200  # a new delivery still passes


def test_seen_deliveries_stay_bounded() -> None:
    seen = SeenDeliveries(limit=3)
    for i in range(5):
        seen.admit(f"d{i}", 1000.0, 300.0)
    seen.admit("d0", 1000.0, 300.0)  # forgotten (over the limit): verify's age check remains
    with pytest.raises(WebhookRejected, match="accepted already"):
        seen.admit("d4", 1000.0, 300.0)
    seen.admit("d4", 1000.0 + 601, 300.0)  # long past the age window
