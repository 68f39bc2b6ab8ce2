"""`make demo`: the whole loop on the local stack, ending in one summary line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.settings import Settings
from deploy.stack import LocalStack
from stream.contracts.signal import Signal
from stream.ingest.archive import ArchiverConfig, ClickHouseArchive, run_archiver
from stream.ingest.feed import Pacing, publish, read_trades
from stream.kafka.clients import ensure_topics
from tickserve.errors import StackError
from training.dataset import build_dataset
from training.train import train_and_register

HISTORY_FRACTION = 0.75


class SignalSink:
    """Reads `signals` from the beginning (no group) and keeps one entry per tick."""

    def __init__(self, settings: Settings):
        """Prepare; `start` connects."""
        self.settings = settings
        self.seen: dict[str, Signal] = {}
        self.latency_ms: dict[str, float] = {}
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        """Assign every partition of the signals topic from offset 0."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
            **self.settings.kafka_security.aiokafka_kwargs(),
        )
        await self.consumer.start()
        parts = [
            TopicPartition(self.settings.signals_topic, p) for p in range(self.settings.partitions)
        ]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)

    async def poll(self, live_since_ns: int | None, show_every: int = 0) -> None:
        """Read what is there; record tick-to-signal latency of live ticks."""
        assert self.consumer is not None
        batches = await self.consumer.getmany(timeout_ms=100)
        now = time.time_ns()
        for msgs in batches.values():
            for m in msgs:
                sig = Signal.decode(m.value)
                key = f"{sig.symbol}|{sig.trade_id}"
                self.seen[key] = sig
                if live_since_ns is not None and sig.recv_ns >= live_since_ns:
                    self.latency_ms[key] = (now - sig.recv_ns) / 1e6
                    if show_every and len(self.latency_ms) % show_every == 0:
                        print(
                            f"  signal {sig.symbol} {sig.trade_id} score={sig.score} "
                            f"dir={sig.direction:+d} model={sig.model}/{sig.version} "
                            f"latency={self.latency_ms[key]:.1f} ms",
                            flush=True,
                        )

    async def wait_for(self, count: int, timeout_s: float, live_since_ns: int | None) -> None:
        """Poll until `count` distinct ticks have a signal, or the timeout."""
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count and time.monotonic() < deadline:
            await self.poll(live_since_ns)

    async def stop(self) -> None:
        """Close the consumer."""
        if self.consumer is not None:
            await self.consumer.stop()


def _spawn_worker(settings: Settings, log_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TICKSERVE_STATE_DIR": str(settings.state_dir.resolve())}
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


def run_demo(settings: Settings, data: Path, live_rate: float) -> int:
    """Feed history, archive, train, register, serve, feed live ticks, summarize."""
    stack = LocalStack(settings)
    stack.down()  # a fresh in-memory broker: topics from an earlier run would be replayed
    print("demo: starting the local stack", flush=True)
    for c in stack.up():
        print(f"  {c.name:<11} {c.url}", flush=True)
    worker: subprocess.Popen[bytes] | None = None
    try:
        ticks = read_trades(data)
        cut = int(len(ticks) * HISTORY_FRACTION)
        history, live = ticks[:cut], ticks[cut:]
        topics = [settings.ticks_topic, settings.signals_topic, settings.dlq_topic]
        security = settings.kafka_security
        asyncio.run(ensure_topics(settings.bootstrap, topics, settings.partitions, security))

        print(f"demo: publishing {len(history)} historical ticks from {data.name}", flush=True)
        asyncio.run(publish(history, settings.bootstrap, settings.ticks_topic, security=security))

        archive = ClickHouseArchive.open(settings.clickhouse)
        config = ArchiverConfig(
            settings.bootstrap, settings.ticks_topic, settings.archive_group_id, security=security
        )
        inserted = asyncio.run(run_archiver(archive, config, asyncio.Event(), idle_exit_s=2.0))
        print(
            f"demo: archived {inserted} ticks ({archive.count_ticks()} in ClickHouse)", flush=True
        )

        spec = settings.feature_spec
        result = train_and_register(
            build_dataset(archive.read_ticks(), spec),
            spec,
            settings.mlflow_uri,
            settings.model_name,
            settings.model_alias,
        )
        print(
            f"demo: registered {result.name} v{result.version} @{settings.model_alias} "
            f"(test accuracy {result.metrics['test_accuracy']:.3f})",
            flush=True,
        )

        worker_log = stack.logs / "worker.log"
        worker = _spawn_worker(settings, worker_log)
        print(f"demo: worker started (log: {worker_log})", flush=True)
        summary = asyncio.run(_measure(settings, history, live, live_rate, worker))
        summary = summary.replace("model=?", f"model={result.name}/{result.version}")
        print(summary, flush=True)
        if settings.http_port:
            print(_scrape_metrics(settings, stack.logs / "worker-metrics.prom"), flush=True)
        if settings.monitor_http_port:
            print(_monitor_figures(settings.monitor_http_port, 120.0), flush=True)
        return 0
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        stack.down()
        print("demo: local stack stopped", flush=True)


def _scrape_metrics(settings: Settings, saved: Path) -> str:
    """GET the worker's /metrics, keep it in `saved`, and sum up the seed metrics."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{settings.http_port}/metrics"
    with urlopen(url, timeout=10) as answer:  # noqa: S310 (our own worker, http on loopback)
        text = answer.read().decode()
    saved.write_text(text)
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    shown = (
        "predictions_total",
        "prediction_latency_seconds_count",
        "ticks_total",
        "dead_letters_total",
        "consumer_lag",
        "model_swaps_total",
    )
    figures = " ".join(f"{name}={values.get(name, 0.0):g}" for name in shown)
    return f"demo: worker {url}: {figures} (all of it in {saved})"


def _monitor_figures(port: int, timeout_s: float) -> str:
    """Wait until the monitor's /metrics shows accuracy and PSI; one line about them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(url, timeout=5) as page:
            families = text_string_to_metric_families(page.read().decode())
            samples = [s for f in families for s in f.samples]
        accuracy = [s for s in samples if s.name == "model_directional_accuracy"]
        psi = [s for s in samples if s.name == "feature_psi"]
        if accuracy and psi:
            break
        if time.monotonic() > deadline:
            raise StackError("monitor", f"no model_directional_accuracy and feature_psi at {url}")
        time.sleep(0.5)
    shown = ", ".join(
        f"{s.labels['symbol']}/{s.labels['window']}={s.value:.3f}" for s in accuracy[:4]
    )
    worst = max(psi, key=lambda s: s.value)
    return (
        f"demo: monitor {url}: model_directional_accuracy {shown}; "
        f"{len(psi)} feature_psi, highest {worst.labels['feature']}={worst.value:.3f}"
    )


async def _measure(
    settings: Settings,
    history: list[dict[str, object]],
    live: list[dict[str, object]],
    live_rate: float,
    worker: subprocess.Popen[bytes],
) -> str:
    sink = SignalSink(settings)
    await sink.start()
    try:
        await sink.wait_for(len(history), 120.0, None)
        if worker.poll() is not None:
            raise StackError("worker", f"exited with status {worker.returncode}")
        print(
            f"demo: {len(sink.seen)} signals for the history; live ticks at {live_rate:g}/s:",
            flush=True,
        )
        live_since = time.time_ns()
        sender = asyncio.create_task(
            publish(
                live,
                settings.bootstrap,
                settings.ticks_topic,
                Pacing(rate=live_rate),
                security=settings.kafka_security,
            )
        )
        while not sender.done():
            await sink.poll(live_since, show_every=250)
        await sender
        await sink.wait_for(len(history) + len(live), 60.0, live_since)
    finally:
        await sink.stop()
    lat = np.array(list(sink.latency_ms.values())) if sink.latency_ms else np.array([np.nan])
    versions = {s.version for s in sink.seen.values() if s.ready}
    model = f"?{'' if len(versions) <= 1 else ' versions=' + ','.join(sorted(versions))}"
    return (
        f"demo: ticks={len(history) + len(live)} signals={len(sink.seen)} model={model} "
        f"p50_ms={np.percentile(lat, 50):.1f} p99_ms={np.percentile(lat, 99):.1f}"
    )
