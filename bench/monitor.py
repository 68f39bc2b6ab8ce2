"""`python -m bench monitor`: the rate `tickserve monitor` holds, on a backlog of summaries.

A fresh broker and MLflow store; a reference registered; the monitor started and
shown one probe summary (so its group join and table recovery are behind it); then
`--ticks` synthetic ticks (known truth, 70% right) are published as fast as the
producer goes, as summaries of `--batch` ticks (what the worker sends per
micro-batch), while the monitor's counters are scraped. Two figures:

- sustained: summaries (and ticks) per second from the start of publishing until the
  monitor has judged the last one: through the broker, publishing included;
- capacity: summaries per second of the monitor's own busy time (judging and table
  updates, `monitor_busy_seconds_total`), what it would hold with the broker out of
  the way.
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
            log = Path(tmp) / "monitor.log"
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deploy.cli", "monitor"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env(settings),
                )
            port = settings.monitor_http_port
            deadline = time.monotonic() + config.timeout_s

            def wait_for(count: float) -> None:
                while _counter(port, "monitor_summaries_total") < count:
                    if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"monitor stopped or timed out: {log.read_text()[-2000:]}"
                        )
                    time.sleep(0.05)

            asyncio.run(_publish(settings, feed.summaries[:1]))
            wait_for(1)
            busy0 = _counter(port, "monitor_busy_seconds_total")
            started = time.monotonic()
            asyncio.run(_publish(settings, feed.summaries[1:]))
            published_s = time.monotonic() - started
            wait_for(len(feed.summaries))
            elapsed = time.monotonic() - started
            busy = _counter(port, "monitor_busy_seconds_total") - busy0
            n = len(feed.summaries) - 1
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
            stack.down(("broker",))
    per_summary = feed.ticks / len(feed.summaries)
    figures = {
        "summaries": float(n),
        "ticks": n * per_summary,
        "batch": float(config.batch),
        "publish_s": published_s,
        "summaries_per_s": n / elapsed,
        "ticks_per_s": n * per_summary / elapsed,
        "capacity_summaries_per_s": n / busy if busy > 0 else float("inf"),
        "capacity_ticks_per_s": n * per_summary / busy if busy > 0 else float("inf"),
        "encode_us_per_summary": _encode_us(feed.summaries),
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (config.out_dir / f"monitor-{stamp}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def summary(figures: dict[str, float]) -> str:
    """One line for the terminal."""
    return (
        f"monitor: sustained {figures['summaries_per_s']:,.0f} summaries/s of "
        f"{figures['batch']:.0f} ticks = {figures['ticks_per_s']:,.0f} ticks/s through the "
        f"broker ({figures['summaries']:.0f} summaries, publishing took "
        f"{figures['publish_s']:.1f} s); capacity {figures['capacity_summaries_per_s']:,.0f} "
        f"summaries/s = {figures['capacity_ticks_per_s']:,.0f} ticks/s of busy time; "
        f"encoding one summary {figures['encode_us_per_summary']:.0f} us"
    )
