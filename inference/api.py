"""HTTP API (FastAPI): predictions through the same MicroBatcher, model info, probes, metrics.

Also the MLflow webhook that makes the watcher poll at once when an alias moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, model_validator

from inference.batcher import MicroBatcher, RowScore
from inference.guard import BodyLimit, bearer
from inference.registry import LoadedModel
from inference.webhook import WEBHOOKS, WebhookConfig, WebhookPayload, ignore_reason, verify
from tickserve.errors import StaleRow, WebhookRejected
from tickserve.limits import MAX_SYMBOL_LEN
from tickserve.metrics import PREDICTIONS, SymbolLabels

logger = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)
# strict: no "1.5" strings or true/false turned into numbers; within float32, which scores them
FeatureValue = Annotated[
    float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)
]
MAX_BODY_BYTES = 64 * 1024
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiContext:
    """What the API reads from the process it is served in (the stream worker, usually).

    Attributes:
        batcher: Scores every request, in the same queue as the stream.
        feature_names: Column order of a feature row.
        latest: Symbol -> (event_ns, newest ready feature row), or None when unknown.
        consumer_ready: Whether the Kafka consumer has its partitions.
        threshold: P(up) at or above which the direction is 1 (else -1).
        webhook: Who may trigger a registry poll through `POST /webhooks/mlflow`; None
            (no secret configured) refuses every delivery with 403.
        stream_not_ready: Why the stream cannot serve yet (e.g. replaying to its
            committed offsets after a restore), or None.
        token: Bearer token that `POST /predict` and `GET /model` require; None: open.
        max_body_bytes: Larger request bodies get 413 before they are read.
        metrics_route: Serve `GET /metrics` here (False: it has a port of its own).
        symbols: The `symbol` labels of predictions_total (the stream worker's, so both
            count under the same bounded set); None: a set of this API's own.
        stream_loop: The event loop the batcher, the feature rows, the readiness reasons
            and the webhook's wake live on, when the API is served on a loop of its own
            (`serve_http_apart`); None: the API's loop is theirs.
    """

    batcher: MicroBatcher
    feature_names: tuple[str, ...]
    latest: Callable[[str], tuple[int, np.ndarray] | None]
    consumer_ready: Callable[[], bool]
    threshold: float = 0.5
    webhook: WebhookConfig | None = None
    token: SecretStr | None = None
    stream_not_ready: Callable[[], str | None] = lambda: None
    max_body_bytes: int = MAX_BODY_BYTES
    metrics_route: bool = True
    symbols: SymbolLabels | None = None
    stream_loop: asyncio.AbstractEventLoop | None = None


async def on_stream(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the stream's loop (`ApiContext.stream_loop`) and wait for it here."""
    if loop is None or loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class ErrorBody(BaseModel):
    """Every 4xx/5xx this API raises itself."""

    detail: str


class PredictResponse(BaseModel):
    """One score, and which model version produced it."""

    model: str
    version: str
    score: float = Field(description="P(up) from the model")
    direction: int = Field(description="1 if score >= threshold else -1")
    symbol: str | None = None
    features_event_ns: int | None = Field(None, description="event time of the features used")


class VersionInfo(BaseModel):
    """A served model version."""

    name: str
    version: str
    alias: str
    feature_spec_hash: str
    provider: str
    engine: str = Field(description="what scores rows: tree-kernel, linear-kernel or onnxruntime")
    engines: dict[str, str | None] = Field(
        description="the CPU engine and the GPU engine (null where no GPU engine serves)"
    )
    crossover_batch: int | None = Field(
        description="batches of at least this many rows go to the GPU (null: all on the CPU)"
    )
    gpu_reason: str = Field(description="why the GPU engine serves from that size, or not at all")
    engine_costs_us: dict[str, dict[str, float]] | None = Field(
        description="median microseconds per batch of each engine, per batch size measured"
    )
    loaded_at: datetime
    loaded_at_ns: int


class ModelInfo(VersionInfo):
    """The champion (scored to signals) and the challenger (shadow), if any."""

    challenger: VersionInfo | None = None


class Health(BaseModel):
    """Liveness."""

    status: str = "ok"


class Readiness(BaseModel):
    """Readiness and its parts."""

    ready: bool
    model_loaded: bool
    consumer_assigned: bool
    reason: str | None = Field(
        None, description="why not ready: no model, no partitions, replaying, rebuilding, stalled"
    )


class WebhookAnswer(BaseModel):
    """What a verified MLflow delivery led to."""

    status: Literal["polling", "ignored"] = Field(
        description="polling: the watcher polls the registry now; ignored: not our alias"
    )
    detail: str


def _version_info(model: LoadedModel) -> dict[str, Any]:
    routing = model.scorer.engines()
    return {
        "engines": routing["engines"],
        "crossover_batch": routing["crossover_batch"],
        "gpu_reason": routing["reason"],
        "engine_costs_us": routing["costs_us"],
        "name": model.name,
        "version": model.version,
        "alias": model.alias,
        "feature_spec_hash": model.spec_hash,
        "provider": model.scorer.provider,
        "engine": model.scorer.engine,
        "loaded_at": datetime.fromtimestamp(model.loaded_at_ns / 1e9, tz=UTC),
        "loaded_at_ns": model.loaded_at_ns,
    }


def _json_safe(value: Any) -> Any:
    """Validation errors echo the input; NaN/inf there must not break the JSON answer."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _predict_request_model(feature_names: tuple[str, ...]) -> type[BaseModel]:
    """The request body, with the feature count of this deployment in its schema."""
    n = len(feature_names)

    def one_of(self: Any) -> Any:
        if (self.features is None) == (self.symbol is None):
            raise ValueError("give exactly one of 'features' or 'symbol'")
        return self

    return create_model(
        "PredictRequest",
        __doc__="Score either a feature row or the latest features of a symbol.",
        # exactly one of the two, said in the schema as well as checked
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"oneOf": [{"required": ["features"]}, {"required": ["symbol"]}]},
        ),
        __validators__={"one_of": model_validator(mode="after")(one_of)},  # type: ignore[dict-item]
        features=(
            list[FeatureValue] | None,
            Field(
                None,
                min_length=n,
                max_length=n,
                description=f"{n} finite numbers in the order {', '.join(feature_names)}",
            ),
        ),
        symbol=(
            str | None,
            Field(
                None,
                min_length=1,
                max_length=MAX_SYMBOL_LEN,
                description="use this symbol's latest row",
            ),
        ),
    )


def create_app(ctx: ApiContext) -> FastAPI:
    """The FastAPI application over `ctx` (no I/O until served)."""
    app = FastAPI(
        title="tickserve",
        version="0.1.0",
        description="Scores from the serving model; probes and metrics of the stream worker.",
    )
    app.add_middleware(BodyLimit, max_bytes=ctx.max_body_bytes)
    request_model = _predict_request_model(ctx.feature_names)
    authorized = [Depends(bearer(ctx.token))]
    if ctx.token is not None:
        errors_auth: dict[int | str, dict[str, Any]] = {
            401: {"model": ErrorBody, "description": "missing or wrong bearer token"}
        }
    else:
        errors_auth = {}
    symbol_label = (ctx.symbols if ctx.symbols is not None else SymbolLabels()).label

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # same body as FastAPI's own 422 (HTTPValidationError), but always valid JSON
        detail = _json_safe(jsonable_encoder(exc.errors()))
        return JSONResponse({"detail": detail}, status_code=422)

    errors: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody, "description": "unknown symbol or no features yet"},
        503: {"model": ErrorBody, "description": "the row went stale in the queue"},
        413: {"model": ErrorBody, "description": "request body too large"},
        **errors_auth,
    }

    async def predict(body: request_model) -> PredictResponse:  # type: ignore[valid-type]
        """Score `features`, or the newest ready features the worker computed for `symbol`."""
        origin_ns = time.time_ns()
        symbol = body.symbol  # type: ignore[attr-defined]
        features = body.features  # type: ignore[attr-defined]

        async def scored() -> tuple[int | None, RowScore] | None:
            # on the stream's loop: the feature rows and the batcher's queue live there
            event_ns = None
            if symbol is not None:
                latest = ctx.latest(symbol)
                if latest is None:
                    return None
                event_ns, row = latest
            else:
                row = np.asarray(features, np.float32)
            return event_ns, await ctx.batcher.score_row(row, origin_ns)

        try:
            found = await on_stream(ctx.stream_loop, scored())
        except StaleRow as exc:
            raise HTTPException(503, f"not scored: {exc}") from exc
        if found is None:
            raise HTTPException(404, f"no ready features for symbol {symbol!r}")
        event_ns, answer = found
        score = answer.score
        if not math.isfinite(score):
            raise HTTPException(503, "the model returned a non-finite score")
        # a row given as features has no symbol: it counts under symbol=""
        PREDICTIONS.labels(answer.model.name, "" if symbol is None else symbol_label(symbol)).inc()
        return PredictResponse(
            model=answer.model.name,
            version=answer.model.version,
            score=score,
            direction=1 if score >= ctx.threshold else -1,
            symbol=symbol,
            features_event_ns=event_ns,
        )

    # the body type is built at runtime, so the (string) annotation cannot name it
    predict.__annotations__["body"] = request_model
    app.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=errors,
        summary="Score one row",
        dependencies=authorized,
    )

    @app.get(
        "/model",
        response_model=ModelInfo,
        summary="The serving model version",
        dependencies=authorized,
        responses=errors_auth,
    )
    async def model() -> ModelInfo:
        """Champion name, version, alias, FeatureSpec hash, provider, load time; challenger."""
        challenger = ctx.batcher.challenger
        return ModelInfo(
            **_version_info(ctx.batcher.model),
            challenger=VersionInfo(**_version_info(challenger)) if challenger else None,
        )

    @app.get("/health", response_model=Health, summary="Liveness")
    async def health() -> Health:
        """The process and its event loop answer."""
        return Health()

    @app.get(
        "/ready",
        response_model=Readiness,
        summary="Readiness",
        responses={503: {"model": Readiness, "description": "not ready"}},
    )
    async def ready() -> Any:
        """A model serves, the consumer has its partitions and the stream advances.

        Not ready, the body says why: no model, no partitions, replaying or rebuilding
        after a restore, or stalled (lag that has not moved for `stall_after_s`).
        """

        async def readiness() -> Readiness:  # on the stream's loop, which owns the state
            state = Readiness(
                ready=False,
                model_loaded=ctx.batcher.model is not None,
                consumer_assigned=ctx.consumer_ready(),
            )
            if not state.model_loaded:
                state.reason = "no model serves"
            elif not state.consumer_assigned:
                state.reason = "the consumer has no partitions yet"
            else:
                state.reason = ctx.stream_not_ready()
            state.ready = state.reason is None
            return state

        state = await on_stream(ctx.stream_loop, readiness())
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    _add_webhook_route(app, ctx.webhook, ctx.stream_loop)
    if ctx.metrics_route:
        _add_metrics_route(app)
    return app


def _add_metrics_route(app: FastAPI) -> None:
    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "exposition format"}},
    )
    async def metrics() -> Response:
        """Every tickserve metric in the Prometheus text format."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _add_webhook_route(
    app: FastAPI, config: WebhookConfig | None, stream_loop: asyncio.AbstractEventLoop | None
) -> None:
    """`POST /webhooks/mlflow`: a signed alias change makes the watcher poll now."""
    body_schema = WebhookPayload.model_json_schema()
    refusals: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "signed, but not an MLflow webhook body"},
        401: {
            "model": ErrorBody,
            "description": "missing headers, bad signature, stale or replayed",
        },
        403: {"model": ErrorBody, "description": "no webhook secret configured"},
    }

    @app.post(
        "/webhooks/mlflow",
        response_model=WebhookAnswer,
        responses=refusals,
        summary="MLflow webhook: an alias moved",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        },
    )
    async def mlflow_webhook(
        request: Request,
        x_mlflow_signature: Annotated[str | None, Header(description="v1,<base64 HMAC>")] = None,
        x_mlflow_timestamp: Annotated[str | None, Header(description="Unix seconds")] = None,
        x_mlflow_delivery_id: Annotated[str | None, Header(description="delivery id")] = None,
    ) -> WebhookAnswer:
        """Verify the HMAC-SHA256 signature and age; for our model's aliases, poll now.

        The payload's version is never trusted: the watcher reads the registry and
        runs every serving check as on any poll.
        """
        if config is None:
            WEBHOOKS.labels("disabled").inc()
            raise HTTPException(403, "webhooks are disabled: TICKSERVE_WEBHOOK_SECRET is not set")
        body = await request.body()
        try:
            payload = verify(
                config.secret.get_secret_value(),
                x_mlflow_signature,
                x_mlflow_timestamp,
                x_mlflow_delivery_id,
                body,
                time.time(),
                config.max_age_s,
            )
            config.seen.admit(x_mlflow_delivery_id or "", time.time(), config.max_age_s)
            ignored = ignore_reason(payload, config.model_name, config.aliases)
        except WebhookRejected as exc:
            WEBHOOKS.labels(exc.reason).inc()
            logger.warning(
                "mlflow webhook refused",
                extra={"reason": exc.reason, "detail": str(exc), "delivery": x_mlflow_delivery_id},
            )
            raise HTTPException(400 if exc.reason == "malformed" else 401, str(exc)) from exc
        if ignored:
            WEBHOOKS.labels("ignored").inc()
            return WebhookAnswer(status="ignored", detail=ignored)
        WEBHOOKS.labels("polling").inc()

        async def wake() -> None:  # the watcher's event belongs to the stream's loop
            config.wake()

        await on_stream(stream_loop, wake())
        logger.info(
            "mlflow webhook: polling the registry now",
            extra={
                "event": f"{payload.entity}.{payload.action}",
                "alias": payload.data["alias"],
                "version": payload.data.get("version"),
                "delivery": x_mlflow_delivery_id,
            },
        )
        return WebhookAnswer(status="polling", detail=f"{payload.action} {payload.data['alias']}")


async def serve_http(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` on the running event loop until `stop` is set.

    `tickserve serve` uses `serve_http_apart`; here a request's row joins the batcher's
    queue on this loop, so a model swap lands between batches for the stream and the API
    alike.
    """
    server = _server(app, host, port)

    async def stop_server() -> None:
        await stop.wait()
        server.should_exit = True

    stopper = asyncio.create_task(stop_server())
    try:
        logger.info("http api serving", extra={"host": host, "port": port})
        await server.serve()
    finally:
        stopper.cancel()


async def serve_http_apart(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve `app` on a thread and event loop of its own until `stop` is set.

    Reading, parsing and validating requests then never runs on the stream's loop:
    only the work that touches the stream's state hops there (`ApiContext.stream_loop`,
    `on_stream`): a row joining the batcher's queue, a symbol's feature row, the
    readiness reasons, the webhook's wake.
    """
    server = _server(app, host, port)
    thread = threading.Thread(
        target=asyncio.run, args=(server.serve(),), name="http-api", daemon=True
    )
    logger.info("http api serving on its own thread", extra={"host": host, "port": port})
    thread.start()
    try:
        await stop.wait()
    finally:
        server.should_exit = True  # uvicorn looks every 0.1 s
        # waited for here, not in an executor whose threads may all be busy at shutdown
        deadline = time.monotonic() + 10.0
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if thread.is_alive():
            logger.warning("http api thread still running at shutdown")


def _server(app: FastAPI, host: str, port: int) -> Any:
    """A uvicorn server for `app` that leaves the process's signals alone."""
    import uvicorn

    class LoopServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # the process owns SIGTERM/SIGINT (they set `stop`); uvicorn must not re-raise them
            yield

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    return LoopServer(config)
