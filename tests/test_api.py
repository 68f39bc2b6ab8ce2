"""HTTP API: predictions through the batcher, validation errors, probes, metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate as validate_openapi

from deploy.stack import free_port
from inference.api import ApiContext, create_app, serve_http
from inference.batcher import BatcherConfig, MicroBatcher
from inference.testing import loaded, make_onnx_classifier
from tests.helpers import LoopThread

NAMES = ("return_24h", "rsi_14", "bb_pos_20", "vol_ratio_24")
ROW = [0.01, 55.0, 0.3, 1.2]


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    return make_onnx_classifier(len(NAMES), "logistic", seed=4)


@pytest.fixture
def ctx(onnx_model: bytes) -> ApiContext:
    batcher = MicroBatcher(loaded(onnx_model, len(NAMES), version="7", name="tickserve-test"),
                           len(NAMES), BatcherConfig(max_batch=16, max_delay_us=200))  # fmt: skip
    latest = {"XRP/ETH": (1_570_000_000_000_000_000, np.array(ROW))}
    assigned = {"done": False}
    return ApiContext(batcher, NAMES, latest.get, lambda: assigned["done"])


def call(ctx: ApiContext, fn: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run `fn` against the app in-process, on one event loop with the batcher."""

    async def main() -> Any:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await fn(client)

    return asyncio.run(main())


def test_predict_scores_features_and_symbols_like_the_stream(ctx: ApiContext) -> None:
    expected = float(ctx.batcher.score_batch(np.array([ROW]), np.array([time.time_ns()])).scores[0])

    async def both(client: httpx.AsyncClient) -> list[httpx.Response]:
        return list(await asyncio.gather(
            client.post("/predict", json={"features": ROW}),
            client.post("/predict", json={"symbol": "XRP/ETH"}),
        ))  # fmt: skip

    by_features, by_symbol = call(ctx, both)
    assert by_features.status_code == 200, by_features.text
    body = by_features.json()
    assert body["model"] == "tickserve-test" and body["version"] == "7"
    assert body["score"] == pytest.approx(expected, abs=1e-6)
    assert body["direction"] == (1 if expected >= 0.5 else -1)
    assert by_symbol.status_code == 200
    assert by_symbol.json()["score"] == pytest.approx(expected, abs=1e-6)
    assert by_symbol.json()["features_event_ns"] == 1_570_000_000_000_000_000


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"features": [1.0, 2.0]}, 422, "at least 4"),
        ({"features": [1.0] * 5}, 422, "at most 4"),
        ({"features": ["a", 1, 2, 3]}, 422, "valid number"),
        ({"features": ROW, "symbol": "XRP/ETH"}, 422, "exactly one"),
        ({}, 422, "exactly one"),
        ({"features": ROW, "extra": 1}, 422, "Extra inputs"),
        ({"symbol": ""}, 422, "at least 1"),
        ({"symbol": "NOPE/ETH"}, 404, "no ready features"),
    ],
)
def test_bad_requests_get_clear_4xx(
    ctx: ApiContext, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = call(ctx, lambda c: c.post("/predict", json=body))
    assert response.status_code == status
    assert fragment in response.text


def test_non_finite_and_non_json_bodies_are_refused(ctx: ApiContext) -> None:
    as_json = {"content-type": "application/json"}
    nan = b'{"features": [NaN, 1, 2, 3]}'
    response = call(ctx, lambda c: c.post("/predict", content=nan, headers=as_json))
    assert response.status_code == 422 and "finite" in response.text
    garbage = call(ctx, lambda c: c.post("/predict", content=b"{", headers=as_json))
    assert garbage.status_code == 422


def test_model_health_ready_and_metrics(ctx: ApiContext) -> None:
    async def probes(client: httpx.AsyncClient) -> dict[str, httpx.Response]:
        paths = ("/model", "/health", "/ready", "/metrics")
        return {path: await client.get(path) for path in paths}

    got = call(ctx, probes)
    model = got["/model"].json()
    assert model["version"] == "7" and model["alias"] == "champion"
    assert model["provider"] == "CPUExecutionProvider"
    # no GPU here: every batch on the CPU engine, and the reason says why
    assert model["engines"]["gpu"] is None and model["crossover_batch"] is None
    assert model["engines"]["cpu"] == model["engine"] and model["gpu_reason"]
    assert model["loaded_at"].endswith("Z") or "+00:00" in model["loaded_at"]
    assert model["challenger"] is None
    assert got["/health"].json() == {"status": "ok"}
    assert got["/ready"].status_code == 503
    assert got["/ready"].json()["consumer_assigned"] is False
    assert got["/metrics"].headers["content-type"].startswith("text/plain")
    assert "batcher_batches_total" in got["/metrics"].text


def test_openapi_document_is_valid_and_describes_the_body(ctx: ApiContext) -> None:
    doc = create_app(ctx).openapi()
    validate_openapi(doc)
    schema = doc["components"]["schemas"]["PredictRequest"]
    features = next(s for s in schema["properties"]["features"]["anyOf"] if s["type"] == "array")
    assert features["minItems"] == features["maxItems"] == 4
    assert schema["additionalProperties"] is False
    assert set(doc["paths"]) == {
        "/predict", "/model", "/health", "/ready", "/metrics", "/webhooks/mlflow",
    }  # fmt: skip
    assert "404" in doc["paths"]["/predict"]["post"]["responses"]


def test_served_by_uvicorn_on_the_callers_loop(ctx: ApiContext) -> None:
    port = free_port()
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_event()).result(5)  # type: ignore[attr-defined]
    serving = loop.submit(serve_http(create_app(ctx), "127.0.0.1", port, stop))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/predict", json={"features": ROW})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
        assert response.status_code == 200
        assert math.isfinite(response.json()["score"])
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        serving.result(10)  # type: ignore[attr-defined]
        loop.close()


async def _event() -> asyncio.Event:
    return asyncio.Event()
