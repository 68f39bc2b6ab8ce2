"""The live quality monitor: known-truth accuracy and PSI, the worker's summaries, the faust app."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from deploy.stack import free_port
from features.spec import FeatureSpec
from stream.contracts.summary import BatchSummary
from stream.monitor.judge import Judge
from stream.monitor.quality import psi
from stream.monitor.reference import Reference
from stream.monitor.testing import known_truth, register_reference
from tests.helpers import run, unique
from training.dataset import forward_labels
from training.report import reference_histograms

BAR_NS = 60_000_000_000
SPEC = FeatureSpec(bar_ns=BAR_NS)


def _reference(version: str = "1", rows: int = 20_000) -> Reference:
    X = np.random.default_rng(1).normal(0.0, 1.0, (rows, SPEC.n_features))
    return Reference.from_histograms("synthetic", version, reference_histograms(X, SPEC))


def _judge_all(summaries: list[BatchSummary], reference: Reference | None = None):
    judge = Judge(BAR_NS, horizon_bars=1)
    hits = calls = 0
    bins: dict[str, np.ndarray] = {}
    for summary in summaries:
        # through the wire format, as the monitor receives them
        deltas = judge.add([BatchSummary.decode(summary.encode())], reference)
        for h, c in deltas.calls.values():
            hits, calls = hits + h, calls + c
        for name, counts in deltas.bins.items():
            bins[name] = bins.get(name, 0) + counts
    return hits, calls, bins


def test_a_model_right_70_percent_of_the_time_scores_0_70() -> None:
    feed = known_truth(accuracy=0.7)
    hits, calls, _ = _judge_all(feed.summaries)
    assert calls == feed.calls  # every call whose horizon passed, and no other
    assert hits == feed.hits
    assert abs(hits / calls - 0.70) <= 0.03


def test_the_monitor_judges_with_the_training_labels() -> None:
    """Hits over a random walk equal those computed with training's forward_labels."""
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 20_000
    event_ns = np.sort(rng.integers(0, 40 * BAR_NS, n))
    price = np.round(100 + np.cumsum(rng.normal(0, 0.05, n)), 2)  # ties: labels of NaN
    direction = rng.choice([1, -1], n).astype(np.int8)
    frame = pd.DataFrame({"symbol": ["A"] * n, "event_ns": event_ns, "price": price})
    labels = forward_labels(frame, BAR_NS, 1)
    judged = ~np.isnan(labels.label) & (labels.end_ns <= event_ns[-1])
    expected = int((((labels.label == 1.0) == (direction == 1)) & judged).sum())
    summaries = [
        BatchSummary(
            "m",
            "1",
            ("A",),
            np.zeros(len(rows), np.int32),
            event_ns[rows],
            price[rows],
            direction[rows],
            np.zeros((len(rows), SPEC.n_features), np.float32),
        )
        for rows in np.array_split(np.arange(n), 37)
    ]
    hits, calls, _ = _judge_all(summaries)
    assert calls == int(judged.sum())
    assert hits == expected


def test_psi_flags_a_shifted_feature_and_not_an_unshifted_one() -> None:
    reference = _reference()
    feed = known_truth(shift={0: 1.0}, ticks_per_bar=20)
    _, _, bins = _judge_all(feed.summaries, reference)
    shifted = psi(reference.counts[SPEC.names[0]], bins[SPEC.names[0]])
    steady = [psi(reference.counts[name], bins[name]) for name in SPEC.names[1:]]
    assert shifted > 0.25
    assert max(steady) < 0.05


def test_psi_bins_only_the_reference_version() -> None:
    feed = known_truth(version="2", ticks_per_bar=5)
    _, _, bins = _judge_all(feed.summaries, _reference(version="1"))
    assert bins == {}


# -- the real faust app against the local broker ----------------------------------------


async def _produce(settings, topic: str, values: list[bytes]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, key=b"worker")
        await producer.flush()
    finally:
        await producer.stop()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """model_* and feature_psi samples of the monitor's /metrics (empty while it is down)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("model_directional", "feature_psi", "monitor_rollup")):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _calls(samples, window: str) -> float:
    return sum(
        v for (name, labels), v in samples.items()
        if name == "model_directional_calls" and ("window", window) in labels
    )  # fmt: skip


def _wait_figures(proc, port: int, calls: int, log, timeout_s: float = 180.0):
    """Scrape until the monitor shows `calls` judged calls and PSI for every feature."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        samples = _scrape(port)
        psi_count = sum(1 for (name, _) in samples if name == "feature_psi")
        if _calls(samples, "1h") == calls and psi_count == SPEC.n_features:
            return {k: v for k, v in samples.items() if not k[0].startswith("monitor_")}
        assert proc.poll() is None, f"monitor exited {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (
            f"monitor showed {_calls(samples, '1h')} of {calls} calls, {psi_count} PSI "
            f"after {timeout_s} s: {log.read_text()[-3000:]}"
        )
        time.sleep(0.5)


def _wait_rollup(proc, port: int, log, timeout_s: float = 60.0) -> None:
    """Wait for one more write of the figures to ClickHouse (they are complete now)."""
    import time

    def writes() -> float:
        return _scrape(port).get(("monitor_rollup_writes_total", ()), 0.0)

    start, deadline = writes(), time.monotonic() + timeout_s
    while writes() <= start:
        assert proc.poll() is None, f"monitor exited {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no rollup was written"
        time.sleep(0.2)


def _start_monitor(settings, log):
    import subprocess
    import sys

    from deploy.stack import child_env

    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "monitor"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(settings),
        )


def _stop(proc) -> None:
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the monitor did not stop within 60 s of SIGTERM") from None


def _read_rollups(dsn: str) -> list[dict]:
    """The newest rollups, read in a subprocess (the embedded engine: one path per process)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from stream.monitor.rollups import RollupWriter; "
        "print(json.dumps(RollupWriter.open(sys.argv[1]).latest(), default=str))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, dsn], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.services
@pytest.mark.timeout(900)  # two faust group joins (~31 s each on the local broker), bounded waits
def test_faust_monitor_exports_known_truth_and_keeps_it_across_a_restart(
    stack_settings, tmp_path
) -> None:
    name = unique("monitored")
    settings = stack_settings.model_copy(
        update={
            "model_name": name,
            "summary_topic": unique("summary"),
            "monitor_app_id": unique("monitor"),
            "monitor_http_port": free_port(),
            "monitor_rollup_s": 1.0,
            "model_poll_s": 1.0,
            "state_dir": tmp_path,
        }
    )
    version = register_reference(settings.mlflow_uri, name, settings.model_alias)
    feed = known_truth(accuracy=0.7, shift={0: 1.0}, model=name, version=version)
    run(_produce(settings, settings.summary_topic, [s.encode() for s in feed.summaries]))

    log = tmp_path / "monitor.log"
    proc = _start_monitor(settings, log)
    try:
        before = _wait_figures(proc, settings.monitor_http_port, feed.calls, log)
        _wait_rollup(proc, settings.monitor_http_port, log)
    finally:
        _stop(proc)
    hits = sum(
        v * before[("model_directional_calls", labels)]
        for (metric, labels), v in before.items()
        if metric == "model_directional_accuracy" and ("window", "24h") in labels
    )
    assert _calls(before, "24h") == feed.calls
    assert round(hits) == feed.hits
    assert abs(hits / feed.calls - 0.70) <= 0.03
    psis = {dict(labels)["feature"]: v for (m, labels), v in before.items() if m == "feature_psi"}
    assert psis[SPEC.names[0]] > 0.25
    assert max(v for f, v in psis.items() if f != SPEC.names[0]) < 0.05

    rollups = _read_rollups(settings.monitor_clickhouse)
    kinds = {r["kind"] for r in rollups if r["model"] == name}
    assert kinds == {"accuracy", "psi"}

    proc = _start_monitor(settings, log)  # state comes back from the changelog topics
    try:
        after = _wait_figures(proc, settings.monitor_http_port, feed.calls, log)
    finally:
        _stop(proc)
    assert after == before


def test_the_worker_publishes_a_summary_before_each_commit() -> None:
    """Prices of every accepted tick, the calls of the scored ones, and their feature rows."""
    import asyncio
    import time

    from features.engine import FeatureEngine
    from inference.batcher import BatcherConfig, MicroBatcher
    from inference.testing import loaded, make_onnx_classifier
    from stream.contracts.tick import Tick
    from stream.kafka.base import DataPlane, DataPlaneConfig
    from stream.kafka.testing import FakeSink, FakeSource, fetched_of
    from stream.worker import StreamWorker, WorkerConfig

    spec = FeatureSpec(bar_ns=100_000)  # every tick closes a bar: ready after the warm-up
    model = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    batcher = MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100))
    source, sink = FakeSource(), FakeSink()
    plane = DataPlaneConfig("nowhere:1", "ticks", "g")
    config = WorkerConfig(plane, "signals", "dlq", commit_interval_s=0.0, summary_topic="sum")
    worker = StreamWorker(config, FeatureEngine(spec), batcher, lambda _: DataPlane(source, sink))
    start = time.time_ns() - 10**9
    ticks = [
        (sym.encode(), Tick(sym, start + i * 100_000, 1.0 + i / 100, 1.0, "buy", f"t{i}", start))
        for i in range(60)
        for sym in ("A", "B")
    ]
    source.push(fetched_of("ticks", [(0, i, k, t.encode()) for i, (k, t) in enumerate(ticks)]))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while not source.commits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(main())
    [record] = [r for r in sink.records if r.topic == "sum"]  # one micro-batch, one commit
    assert record.key == b"g"
    summary = BatchSummary.decode(record.value)
    assert len(summary) == 120 and sorted(summary.symbols) == ["A", "B"]
    assert (summary.model, summary.version) == (batcher.model.name, batcher.model.version)
    scored = summary.direction != 0
    assert 0 < scored.sum() < 120  # the warm-up ticks are not called
    assert summary.features.shape == (int(scored.sum()), spec.n_features)
    a = np.array(summary.symbols)[summary.symbol_index] == "A"
    assert summary.price[a].tolist() == [1.0 + i / 100 for i in range(60)]


def test_monitor_port_in_use_and_no_topic_are_one_line(tmp_path) -> None:
    import socket

    from tests.helpers import error_lines, tickserve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {"TICKSERVE_MONITOR_HTTP_PORT": str(port)}
        done = tickserve("monitor", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done) == [
        f"tickserve monitor: error: monitor HTTP port {port} is already in use"
    ]
    done = tickserve("monitor", env={"TICKSERVE_SUMMARY_TOPIC": ""}, cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done) == [
        "tickserve monitor: error: TICKSERVE_SUMMARY_TOPIC is empty: the workers publish "
        "nothing to judge"
    ]


def test_summaries_gather_micro_batches_and_split_by_version_and_size(monkeypatch) -> None:
    """One record per run of one model version, none over MAX_ROWS, rows in stream order."""
    import asyncio
    from types import SimpleNamespace

    from stream.contracts.tickcodec import TickSpans
    from stream.kafka.testing import FakeSink
    from stream.worker import summaries

    monkeypatch.setattr(summaries, "MAX_ROWS", 5)
    sink = FakeSink()
    names = ["A", "B", "C"]
    publisher = summaries.SummaryPublisher(sink, "sum", b"g", 0.5, names)
    offset = 0

    def add(n: int, version: str, slots: list[int]) -> None:
        nonlocal offset
        spans = SimpleNamespace(
            event_ns=np.arange(offset, offset + n, dtype=np.int64),
            price=np.arange(offset, offset + n, dtype=np.float64),
        )
        offset += n
        scored = np.arange(n) % 2 == 0
        scores = np.where(scored, 0.9, np.nan)
        features = np.repeat(spans.price[:, None], 2, axis=1)
        model = SimpleNamespace(name="m", version=version)
        accepted = np.ones(n, np.bool_)
        publisher.add(
            cast(TickSpans, spans), np.array(slots), accepted, scored, scores, features, model
        )

    add(3, "1", [2, 0, 2])
    add(4, "1", [1, 1, 1, 1])
    add(7, "2", [0] * 7)  # alone over MAX_ROWS: cut
    assert publisher.pending == 3
    acks = asyncio.run(publisher.flush())
    assert len(acks) == 4 and publisher.pending == 0
    got = [BatchSummary.decode(r.value) for r in sink.records]
    assert [(s.version, len(s)) for s in got] == [("1", 3), ("1", 4), ("2", 5), ("2", 2)]
    assert got[0].symbols == ("A", "C") and got[0].symbol_index.tolist() == [1, 0, 1]
    assert np.concatenate([s.event_ns for s in got]).tolist() == list(range(14))
    for s in got:  # the feature rows are those of the called ticks
        assert s.features[:, 0].tolist() == s.price[s.direction != 0].tolist()
