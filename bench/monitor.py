"""`python -m bench monitor`: the rate `tickserve monitor` holds, on a backlog of summaries.

A fresh broker and MLflow store; a reference registered; `--ticks` synthetic ticks
(known truth, 70% right) published as summaries of `--batch` ticks (what the worker
sends per micro-batch); then the monitor is started and its counters scraped until
it has judged them all. The rate is taken between its first and its last processed
summary, so the group join and the table recovery are not in it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deploy.settings import Settings
from deploy.stack import LocalStack, child_env, free_port
from stream.contracts.summary import BatchSummary
from stream.kafka.clients import ensure_topics
from stream.monitor.testing import known_truth, register_reference


@dataclass(frozen=True, slots=True)
class MonitorBenchConfig:
    """How much to send, in what shape."""

    ticks: int = 400_000
    batch: int = 1000
    symbols: int = 20
    timeout_s: float = 600.0
    out_dir: Path = Path("bench/results")


def _counter(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def _publish(settings: Settings, summaries: list[BatchSummary]) -> None:
    from aiokafka import AIOKafkaProducer

    await ensure_topics(settings.bootstrap, [settings.summary_topic], settings.partitions)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap, linger_ms=5, max_request_size=16_000_000
    )
    await producer.start()
    try:
        for s in summaries:
            await producer.send(settings.summary_topic, s.encode(), key=b"bench")
        await producer.flush()
    finally:
        await producer.stop()


def _encode_us(summaries: list[BatchSummary]) -> float:
    """Median time to encode one summary (the worker's added cost per micro-batch, in part)."""
    times = []
    for s in summaries[:200]:
        t = time.perf_counter()
        s.encode()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def run_monitor_bench(config: MonitorBenchConfig) -> dict[str, float]:
    """Measure; returns the figures (also written as JSON under `config.out_dir`)."""
    bars = 60
    per_bar = max(1, config.ticks // (bars * config.symbols))
    feed = known_truth(
        symbols=config.symbols, bars=bars, ticks_per_bar=per_bar, batch=config.batch, version="1"
    )
    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as tmp:
        settings = Settings(
            state_dir=Path(tmp), broker_port=free_port(), valkey_port=free_port(),
            mlflow_tracking_uri=None, monitor_http_port=free_port(), model_name="synthetic",
            summary_topic="signals.summary", partitions=1, monitor_rollup_s=5.0,
        )  # fmt: skip
        stack = LocalStack(settings)
        stack.start_broker()
        proc = None
        try:
            stack.check_mlflow()
            register_reference(settings.mlflow_uri, settings.model_name, settings.model_alias)
            asyncio.run(_publish(settings, feed.summaries))
            log = Path(tmp) / "monitor.log"
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deploy.cli", "monitor"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env(settings),
                )
            port, total = settings.monitor_http_port, len(feed.summaries)
            deadline = time.monotonic() + config.timeout_s
            first: tuple[float, float] | None = None
            done = 0.0
            while done < total:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"monitor stopped or timed out: {log.read_text()[-2000:]}")
                done = _counter(port, "monitor_summaries_total")
                if done and first is None:
                    first = (time.monotonic(), done)
                time.sleep(0.05)
            assert first is not None
            elapsed = time.monotonic() - first[0]
            summaries_s = (total - first[1]) / elapsed if elapsed > 0 else float("inf")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
            stack.down(("broker",))
    figures = {
        "summaries": float(len(feed.summaries)),
        "ticks": float(feed.ticks),
        "batch": float(config.batch),
        "summaries_per_s": summaries_s,
        "ticks_per_s": summaries_s * feed.ticks / len(feed.summaries),
        "encode_us_per_summary": _encode_us(feed.summaries),
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (config.out_dir / f"monitor-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def summary(figures: dict[str, float]) -> str:
    """One line for the terminal."""
    return (
        f"monitor: {figures['summaries_per_s']:,.0f} summaries/s of {figures['batch']:.0f} ticks "
        f"= {figures['ticks_per_s']:,.0f} ticks/s ({figures['summaries']:.0f} summaries, "
        f"{figures['ticks']:.0f} ticks); encoding one: {figures['encode_us_per_summary']:.0f} us"
    )
