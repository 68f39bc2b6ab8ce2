"""The composition root: the running service (worker, watcher, stores, API) from Settings."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from importlib.metadata import version

from prometheus_client import start_http_server

from deploy.cli import git_commit
from deploy.costs import refresh_costs
from deploy.settings import Settings
from features.engine import FeatureEngine
from features.engine import warm_up as warm_up_features
from features.online import OnlineWriter, open_store
from features.snapshot import SnapshotStore
from inference.api import ApiContext, create_app, serve_http_apart
from inference.batcher import BatcherConfig, MicroBatcher
from inference.engines import GpuPolicy
from inference.linear import warm_up as warm_up_linear
from inference.trees import warm_up as warm_up_trees
from inference.validation import ValidationPolicy
from inference.watcher import ModelWatcher, WatcherConfig
from inference.webhook import WebhookConfig
from stream.kafka import aiokafka_io, confluent_io, wire_io
from stream.kafka.base import DataPlaneConfig, OpenDataPlane
from stream.kafka.clients import ensure_topics
from stream.worker import StreamWorker, WorkerConfig
from tickserve.metrics import BuildInfo, SymbolLabels
from tickserve.tracing import Tracing

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Service:
    """Everything `tickserve serve` runs, built and warmed up, not yet connected.

    Attributes:
        settings: What it was built from.
        worker: The stream worker (ticks -> signals).
        batcher: The scoring queue the stream and the HTTP API share.
        watcher: Follows the registry's aliases and swaps models into `batcher`.
        api: What the HTTP API reads (served only when `settings.http_port` is set).
        topics: The topics the service reads and writes (created if missing).
    """

    settings: Settings
    worker: StreamWorker
    batcher: MicroBatcher
    watcher: ModelWatcher
    api: ApiContext
    topics: tuple[str, ...]

    async def run(self, stop: asyncio.Event) -> None:
        """Create missing topics, then run worker, watcher and HTTP API until `stop` is set."""
        settings = self.settings
        security = settings.kafka_security
        logger.info(
            "kafka", extra={"bootstrap": settings.bootstrap, "security": security.describe()}
        )
        await ensure_topics(settings.bootstrap, list(self.topics), settings.partitions, security)
        others = [
            asyncio.create_task(self.watcher.run(self.batcher, stop)),
            asyncio.create_task(refresh_costs(settings.mlflow_uri, settings.model_name, stop)),
        ]
        if settings.metrics_port:  # scrapes on a thread of their own, off the stream's loop
            start_http_server(settings.metrics_port, addr=settings.http_host)
        if settings.http_port:
            # on a thread and loop of its own: requests are read and checked there, and
            # only what touches the stream's state hops to this loop (bench.predict_hammer)
            api = dataclasses.replace(self.api, stream_loop=asyncio.get_running_loop())
            serving = serve_http_apart(
                create_app(api), settings.http_host, settings.http_port, stop
            )
            others.append(asyncio.create_task(serving))
        try:
            await self.worker.run(stop)
        finally:
            stop.set()
            await asyncio.gather(*others, return_exceptions=True)


def open_dataplane(settings: Settings) -> OpenDataPlane:
    """The data plane the settings choose: exactly once, the wire client, or aiokafka's."""
    if settings.exactly_once:
        return confluent_io.open_dataplane
    return wire_io.open_dataplane if settings.wire else aiokafka_io.open_dataplane


def worker_config(settings: Settings) -> WorkerConfig:
    """The worker's share of the settings."""
    return WorkerConfig(
        DataPlaneConfig(
            bootstrap=settings.bootstrap,
            topic=settings.ticks_topic,
            group_id=settings.group_id,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            max_batch=settings.max_batch,
            linger_ms=settings.linger_ms,
            security=settings.kafka_security,
            transactional_id=settings.transactional_id or "",
        ),
        signals_topic=settings.signals_topic,
        dlq_topic=settings.dlq_topic,
        max_future_ns=settings.max_future_ms * 1_000_000,
        snapshot_interval_s=settings.snapshot_interval_s,
        stall_after_s=settings.stall_after_s,
        commit_interval_s=settings.commit_interval_ms / 1000,
        shadow_topic=settings.shadow_topic if settings.challenger_alias else "",
        summary_topic=settings.summary_topic,
    )


def watcher_config(settings: Settings) -> WatcherConfig:
    """The model watcher's share of the settings."""
    return WatcherConfig(
        settings.mlflow_uri,
        settings.model_name,
        settings.model_alias,
        settings.challenger_alias,
        settings.model_poll_s,
        settings.prefer_gpu,
        ValidationPolicy(
            warmup_rows=settings.max_batch, warmup_budget_s=settings.warmup_budget_ms / 1000
        ),
        onnx_threads=settings.onnx_threads,
        numba_kernels=settings.numba_kernels,
        tensorrt=settings.tensorrt,
        max_non_finite_rate=settings.max_non_finite_rate,
        gpu=GpuPolicy(settings.cuda_graphs, settings.max_batch),
        max_model_bytes=settings.max_model_mb * 2**20,
    )


def build_service(
    settings: Settings, online_store: bool = True, tracing: Tracing | None = None
) -> Service:
    """Load the champion (one that fails its checks never serves) and build the service.

    Args:
        settings: The process's settings.
        online_store: Write the newest feature rows to the online store (Redis via
            Feast); False keeps them for the HTTP API only.
        tracing: Where the worker's spans go (`deploy.tracing.start_tracing`); None: off.
    """
    spec = settings.feature_spec
    build = BuildInfo(version("tickserve"), settings.git_commit or git_commit())
    watcher = ModelWatcher(watcher_config(settings), spec, build)
    model = watcher.load_initial()
    batcher = MicroBatcher(
        model,
        spec.n_features,
        BatcherConfig(settings.max_batch, settings.max_delay_us, settings.stale_ms * 1_000_000),
    )
    writer = None
    if online_store:
        store = open_store(settings.redis, settings.feast_registry)
        writer = OnlineWriter(store, spec, settings.online_flush_s).start()
    warm_up_features(spec)
    warm_up_trees()
    warm_up_linear()
    config = worker_config(settings)
    worker = StreamWorker(
        config,
        FeatureEngine(spec, settings.max_symbols),
        batcher,
        open_dataplane(settings),
        writer,
        SnapshotStore(settings.redis, f"tickserve:snapshots:{settings.group_id}"),
        tracing=tracing,
        symbols=SymbolLabels(settings.metrics_symbol_list),
    )
    webhook = None  # without a secret, POST /webhooks/mlflow refuses every delivery
    if settings.webhook_secret is not None:
        aliases = tuple(a for a in (settings.model_alias, settings.challenger_alias) if a)
        webhook = WebhookConfig(settings.webhook_secret, settings.model_name, aliases, watcher.wake)
    api = ApiContext(
        batcher,
        spec.names,
        worker.latest,
        worker.assigned.is_set,
        config.threshold,
        webhook,
        token=settings.bearer_token,
        stream_not_ready=worker.not_ready_reason,
        max_body_bytes=settings.max_body_bytes,
        metrics_route=not settings.metrics_port,
        symbols=worker.telemetry.symbols,
    )
    topics = [settings.ticks_topic, settings.signals_topic, settings.dlq_topic]
    if config.shadow_topic:
        topics.append(config.shadow_topic)
    if config.summary_topic:
        topics.append(config.summary_topic)
    return Service(settings, worker, batcher, watcher, api, tuple(topics))
