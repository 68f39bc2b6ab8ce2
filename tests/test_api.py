"""HTTP API: predictions through the batcher, validation errors, probes, metrics, OpenAPI."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate as validate_openapi
from prometheus_client import REGISTRY
from pydantic import SecretStr

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


@pytest.mark.parametrize(
    "features",
    [
        ["1.5", 1.0, 2.0, 3.0],  # a numeric string is not coerced
        [True, 1.0, 2.0, 3.0],  # nor a boolean
        [3.5e38, 1.0, 2.0, 3.0],  # past float32, where the model scores it
        [-3.5e38, 1.0, 2.0, 3.0],
    ],
)
def test_features_are_strict_finite_float32_numbers(ctx: ApiContext, features: list[Any]) -> None:
    response = call(ctx, lambda c: c.post("/predict", json={"features": features}))
    assert response.status_code == 422, response.text


def test_integers_are_numbers(ctx: ApiContext) -> None:
    response = call(ctx, lambda c: c.post("/predict", json={"features": [0, 55, 0, 1]}))
    assert response.status_code == 200, response.text


def test_bodies_over_the_limit_get_413_unread(ctx: ApiContext) -> None:
    big = {"features": [1.0] * 20_000}  # ~100 KB of JSON against the 64 KB default

    async def chunked(client: httpx.AsyncClient) -> httpx.Response:
        async def parts() -> Any:
            for _ in range(100):
                yield b" " * 1024  # no Content-Length: counted as it arrives
            yield b'{"features": [1, 2, 3, 4]}'

        return await client.post(
            "/predict", content=parts(), headers={"content-type": "application/json"}
        )

    declared = call(ctx, lambda c: c.post("/predict", json=big))
    assert declared.status_code == 413 and "65536" in declared.text
    streamed = call(ctx, chunked)
    assert streamed.status_code == 413
    small = call(ctx, lambda c: c.post("/predict", json={"features": ROW}))
    assert small.status_code == 200


def test_a_bearer_token_guards_predict_and_model_but_not_probes(ctx: ApiContext) -> None:
    guarded = dataclasses.replace(ctx, token=SecretStr("s3cret"))

    async def calls(client: httpx.AsyncClient) -> dict[str, int]:
        good = {"authorization": "Bearer s3cret"}
        return {
            "none": (await client.post("/predict", json={"features": ROW})).status_code,
            "wrong": (
                await client.post(
                    "/predict", json={"features": ROW}, headers={"authorization": "Bearer nope"}
                )
            ).status_code,
            "good": (
                await client.post("/predict", json={"features": ROW}, headers=good)
            ).status_code,
            "model": (await client.get("/model")).status_code,
            "model_good": (await client.get("/model", headers=good)).status_code,
            "health": (await client.get("/health")).status_code,
            "metrics": (await client.get("/metrics")).status_code,
        }

    assert call(guarded, calls) == {
        "none": 401, "wrong": 401, "good": 200, "model": 401, "model_good": 200,
        "health": 200, "metrics": 200,
    }  # fmt: skip
    doc = create_app(guarded).openapi()
    assert "401" in doc["paths"]["/predict"]["post"]["responses"]


def test_openapi_says_exactly_one_of_features_or_symbol(ctx: ApiContext) -> None:
    schema = create_app(ctx).openapi()["components"]["schemas"]["PredictRequest"]
    assert schema["oneOf"] == [{"required": ["features"]}, {"required": ["symbol"]}]


def test_metrics_can_leave_the_api_port(ctx: ApiContext) -> None:
    apart = dataclasses.replace(ctx, metrics_route=False)
    assert call(apart, lambda c: c.get("/metrics")).status_code == 404


def test_ready_says_why_the_stream_holds_back(ctx: ApiContext) -> None:
    why = "replaying partitions 3 up to their committed offsets"
    replaying = dataclasses.replace(ctx, consumer_ready=lambda: True, stream_not_ready=lambda: why)
    response = call(replaying, lambda c: c.get("/ready"))
    assert response.status_code == 503
    assert response.json()["reason"] == why
    serving = dataclasses.replace(ctx, consumer_ready=lambda: True)
    assert call(serving, lambda c: c.get("/ready")).json() == {
        "ready": True, "model_loaded": True, "consumer_assigned": True, "reason": None,
    }  # fmt: skip


def test_predict_counts_predictions_by_model_and_symbol(ctx: ApiContext) -> None:
    """POST /predict adds to predictions_total like the stream; a feature row has symbol ""."""

    def count(symbol: str) -> float:
        labels = {"model": "tickserve-test", "symbol": symbol}
        return REGISTRY.get_sample_value("predictions_total", labels) or 0.0

    before = (count(""), count("XRP/ETH"))

    async def three(client: httpx.AsyncClient) -> list[int]:
        answers = [
            await client.post("/predict", json={"features": ROW}),
            await client.post("/predict", json={"symbol": "XRP/ETH"}),
            await client.post("/predict", json={"symbol": "XRP/ETH"}),
            await client.post("/predict", json={"symbol": "NOPE/X"}),  # 404: not counted
        ]
        return [a.status_code for a in answers]

    assert call(ctx, three) == [200, 200, 200, 404]
    assert (count("") - before[0], count("XRP/ETH") - before[1]) == (1.0, 2.0)
