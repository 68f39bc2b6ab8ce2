"""End-to-end benchmark: tickserve against echo floors (do-nothing workers), same run, same rate.

Starts a fresh broker and Redis, registers a model, then for each system (the echo
floors, then `tickserve serve`) starts it as its own process, a sink consumer, and
open-loop senders at a fixed rate; reports tick-to-signal percentiles, tickserve's
as ratios over each floor's, the in-process stage breakdown, CPU per tick and RSS.

The floors (`FLOORS`): two on clients tickserve did not write, stock aiokafka
(`bench.echo_aiokafka`) and confluent-kafka/librdkafka (`bench.echo_confluent`), and
one on tickserve's own data plane (`bench.echo`, "echo": what tickserve's work costs
over its own client). `make bench-ci` gates on the fastest independent floor.

Run: python -m bench e2e [--rate 20000 --duration 20 --symbols 100 --sweep 20000,40000]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploy.settings import Settings
from deploy.stack import LocalStack, free_port

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STAGE_COLUMNS = ("broker_in", "decode", "features", "inference", "encode", "produce_out")


@dataclass(frozen=True, slots=True)
class E2EConfig:
    """One benchmark run's knobs."""

    rate: float = 20_000
    duration_s: float = 20.0
    warmup_s: float = 7.0  # excluded from the figures (features warm up in 25 bars)
    symbols: int = 100
    partitions: int = 4
    senders: int = 0  # load generator processes; 0: one per 50,000 ticks/s
    bar_seconds: float = 0.2
    p99_bound_ms: float = 1000.0  # the sweep's definition of "sustainable"
    out_dir: Path = Path("bench/results")
    sweep: tuple[float, ...] = field(default_factory=tuple)
    # the system measured against the floor: "echo" measures the floor against itself,
    # which shows how far the ratios move by chance on this machine
    against: str = "tickserve"
    # SCHED_FIFO priority of both systems' stream thread (TICKSERVE_REALTIME_PRIORITY); 0: none
    realtime_priority: int = 0
    # floor and system measured this many times, alternating, each on a fresh broker;
    # the figures pool every round's ticks (see `pool`), the report keeps each round
    rounds: int = 1
    # fraction of ticks sent with a traceparent; > 0 also points the worker's OTLP
    # exporter at a local receiver (bench.otlp_sink), so tracing is on; 0: tracing off
    trace_sample_rate: float = 0.0
    # at most this many of them a second (the feed's TraceBudget and its default; 0: no cap)
    trace_max_per_second: float = Settings.model_fields["trace_max_per_second"].default
    # the model trained and served (training.params.MODEL_TYPES), and whether the worker
    # may use a GPU (TICKSERVE_PREFER_GPU): issue 23 compares the worker on CPU and GPU
    model_type: str = "logistic"
    gpu: bool = False
    # how long a system may take to start (imports, model load, Numba cache, group join)
    start_timeout_s: float = 300.0
    # the echo floors measured, in this order each round (`FLOORS`)
    floors: tuple[str, ...] = ("aiokafka", "confluent", "echo")
    # every Kafka connection over TLS: each fresh broker behind stunnel4 (bench.tls), a
    # self-signed certificate, TICKSERVE_KAFKA_SECURITY_PROTOCOL=SSL for every process
    tls: bool = False
    # the worker on the exactly-once plane (TICKSERVE_EXACTLY_ONCE); the sink reads
    # uncommitted, so latencies leave out the wait for the transaction's commit
    exactly_once: bool = False


# floor name -> the module that runs it; "echo" is on tickserve's own data plane
FLOORS = {
    "aiokafka": "bench.echo_aiokafka",
    "confluent": "bench.echo_confluent",
    "echo": "bench.echo",
}
INDEPENDENT = ("aiokafka", "confluent")  # floors on clients tickserve did not write
WORKER_READY = "worker consuming"  # the worker's log line once it has its partitions


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: np.ndarray, qs: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict[str, float]:
    if not len(values):
        return {f"p{q:g}": float("nan") for q in qs} | {"max": float("nan")}
    out = {f"p{q:g}": float(np.percentile(values, q)) for q in qs}
    out["max"] = float(values.max())
    return out


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 20 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args} did not report {text!r}; see {path}")


class Bench:
    """A fresh local stack and a registered model for one benchmark session."""

    def __init__(self, config: E2EConfig, workdir: Path):
        """Start broker, Redis and the MLflow store under `workdir`."""
        self.config = config
        self.workdir = workdir
        self.settings = Settings(
            state_dir=workdir, broker_port=free_port(), valkey_port=free_port(), redis_url=None,
            mlflow_tracking_uri=None, http_port=0, bar_seconds=config.bar_seconds,
            partitions=config.partitions, model_name="bench-model",
        )  # fmt: skip
        self.stack = LocalStack(self.settings)
        self._tls_procs: list[subprocess.Popen[bytes]] = []
        if config.tls:
            from bench.tls import certificate

            self._tls_files = certificate(workdir)
        else:
            self.stack.start_broker()
        self.stack.start_redis()
        self.stack.check_mlflow()
        self._register_model()
        self.otlp: subprocess.Popen[str] | None = None
        self.otlp_spans = 0
        if config.trace_sample_rate > 0:
            self.otlp_port = free_port()
            self.otlp = subprocess.Popen(
                [sys.executable, "-m", "bench.otlp_sink", "--port", str(self.otlp_port)],
                env=self._env(), cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self.otlp.stdout is not None
            if self.otlp.stdout.readline().strip() != "ready":
                raise RuntimeError("the OTLP receiver did not start")

    def _register_model(self) -> None:
        """Train a small model on synthetic ticks (the bench measures serving, not skill)."""
        import pandas as pd

        from training.dataset import build_dataset
        from training.params import SplitParams, TrainParams
        from training.train import train_and_register

        spec = self.settings.feature_spec
        rng = np.random.default_rng(5)
        n, symbols = 60_000, 5
        sym = np.arange(n) % symbols
        ticks = pd.DataFrame(
            {
                "symbol": [f"S{s}" for s in sym],
                "event_ns": np.arange(n, dtype=np.int64) * 2_000_000 + 1_700_000_000 * 10**9,
                "price": 100 * np.exp(np.cumsum(rng.normal(0, 2e-4, n))),
                "quantity": rng.exponential(1.0, n),
                "is_buy": rng.random(n) < 0.5,
            }
        ).sort_values(["symbol", "event_ns"], kind="stable")
        ds = build_dataset(ticks, spec)
        h = ds.horizon_bars
        splits = SplitParams(horizon_bars=h, embargo_bars=h + 1)
        params = TrainParams(model_type=self.config.model_type, splits=splits)
        train_and_register(ds, spec, self.settings.mlflow_uri, self.settings.model_name,
                           params=params)  # fmt: skip

    def _fresh_broker(self) -> None:
        """A new broker for each measured system, on a new port.

        The local broker's memory engine keeps every record of the session
        (BROKER.md, 6), so whichever system ran second met a broker already holding
        the first one's records: the order of the runs must not favour one of them.
        """
        if self.config.tls:
            from bench.tls import tls_endpoint

            self._stop_tls()
            self._tls_procs, bootstrap = tls_endpoint(self.workdir, *self._tls_files)
            self.settings = self.settings.model_copy(
                update={"bootstrap_servers": bootstrap, "kafka_security_protocol": "SSL",
                        "kafka_ssl_ca_file": self._tls_files[0]}
            )  # fmt: skip
            return
        self.stack.down(("broker",))
        self.settings = self.settings.model_copy(update={"broker_port": free_port()})
        self.stack.settings = self.settings
        self.stack.start_broker()

    def _stop_tls(self) -> None:
        for proc in self._tls_procs:
            proc.terminate()
            proc.wait(10)
        self._tls_procs = []

    def _env(self, **extra: str) -> dict[str, str]:
        # OTEL_* of the caller's shell would turn tracing on behind the benchmark's back
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "OTEL_"))}
        env.update(PYTHONPATH=str(ROOT), **extra)
        if self.config.tls:  # every process connects as the worker does, over TLS
            env.update(
                TICKSERVE_BOOTSTRAP_SERVERS=self.settings.bootstrap,
                TICKSERVE_KAFKA_SECURITY_PROTOCOL="SSL",
                TICKSERVE_KAFKA_SSL_CA_FILE=str(self._tls_files[0]),
            )
        return env

    def _tracing_env(self) -> dict[str, str]:
        """The worker's tracing: the OTLP receiver and the sample rate, or nothing (off)."""
        if self.otlp is None:
            return {}
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.otlp_port}",
            "TICKSERVE_TRACE_SAMPLE_RATE": str(self.config.trace_sample_rate),
        }

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[Any, Path]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT)  # fmt: skip
        return proc, log

    def start_worker(
        self, tag: str, source: str, state_dir: Path, worker_env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """`tickserve serve` reading `source` into out-<tag> (dlq-<tag>, group g-<tag>).

        Tracing is on where the bench's is (`trace_sample_rate` > 0); `worker_env` adds
        to (or overrides) the variables. The caller waits for `WORKER_READY` in the log.
        """
        env = self._env(
            TICKSERVE_STATE_DIR=str(state_dir),
            TICKSERVE_BROKER_PORT=str(self.settings.broker_port),
            TICKSERVE_VALKEY_PORT=str(self.settings.valkey_port),
            TICKSERVE_TICKS_TOPIC=source, TICKSERVE_SIGNALS_TOPIC=f"out-{tag}",
            TICKSERVE_DLQ_TOPIC=f"dlq-{tag}", TICKSERVE_GROUP_ID=f"g-{tag}",
            TICKSERVE_MODEL_NAME=self.settings.model_name, TICKSERVE_HTTP_PORT="0",
            TICKSERVE_BAR_SECONDS=str(self.config.bar_seconds), TICKSERVE_LOG_LEVEL="INFO",
            TICKSERVE_PREFER_GPU=str(self.config.gpu).lower(),
            TICKSERVE_REALTIME_PRIORITY=str(self.config.realtime_priority),
            TICKSERVE_EXACTLY_ONCE=str(self.config.exactly_once).lower(),
            **self._tracing_env(),
        )  # fmt: skip
        env.update(worker_env or {})
        return self._spawn(tag, [sys.executable, "-m", "deploy.cli", "serve"], env)

    @contextlib.contextmanager
    def system(
        self, kind: str, rate: float, worker_env: dict[str, str] | None = None
    ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
        """Start an echo floor or the tickserve worker; yields (output topic, process).

        `worker_env` adds to (or overrides) the worker's TICKSERVE_* variables.
        """
        import asyncio

        from stream.kafka.clients import ensure_topics

        self._fresh_broker()
        tag = f"{kind}-{int(rate)}-{uuid.uuid4().hex[:6]}"
        source, sink = f"ticks-{tag}", f"out-{tag}"
        bootstrap = self.settings.bootstrap
        topics = [source, sink, f"dlq-{tag}"]
        security = self.settings.kafka_security
        asyncio.run(ensure_topics(bootstrap, topics, self.config.partitions, security))
        if kind in FLOORS:
            argv = [sys.executable, "-m", FLOORS[kind], "--bootstrap", bootstrap, "--source",
                    source, "--sink", sink, "--group", f"g-{tag}"]  # fmt: skip
            if kind == "echo":
                argv += ["--realtime-priority", str(self.config.realtime_priority)]
            proc, log = self._spawn(tag, argv, self._env())
            ready_text = "assigned"
        else:
            proc, log = self.start_worker(tag, source, self.workdir, worker_env)
            ready_text = WORKER_READY
        try:
            _wait_for(log, ready_text, proc, self.config.start_timeout_s)
            self.source = source
            self.dlq = f"dlq-{tag}"
            yield sink, proc
        finally:
            stop_process(proc)
            # keep the system's log beside the report (the work dir is temporary)
            self.config.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, self.config.out_dir / log.name)

    def measure(
        self,
        kind: str,
        rate: float,
        duration_s: float,
        worker_env: dict[str, str] | None = None,
        alongside: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> dict[str, Any]:
        """One system at one rate: latency, stages, CPU per tick, RSS, lost, duplicates.

        `alongside(start_ns)` is entered before the senders start (they send from
        `start_ns` on) and left once they are done: other load during the measurement.
        """
        cfg = self.config
        with (
            self.system(kind, rate, worker_env) as (sink_topic, proc),
            contextlib.ExitStack() as beside,
        ):
            expected = int(rate * duration_s)
            out = self.workdir / f"{kind}-{int(rate)}.npz"
            sink = subprocess.Popen(
                [sys.executable, "-m", "bench.sink", "--bootstrap", self.settings.bootstrap,
                 "--topic", sink_topic, "--partitions", str(cfg.partitions), "--expect",
                 str(expected), "--out", str(out), "--timeout", str(duration_s + 60)],
                env=self._env(), cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert sink.stdout is not None
            if sink.stdout.readline().strip() != "ready":
                raise RuntimeError("the sink did not start")
            start_ns = time.time_ns() + 1_000_000_000
            if alongside is not None:
                beside.enter_context(alongside(start_ns))
            n_senders = cfg.senders or max(1, math.ceil(rate / 50_000))
            senders = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.loadgen",
                        "--bootstrap",
                        self.settings.bootstrap,
                        "--topic",
                        self.source,
                        "--rate",
                        str(rate),
                        "--duration",
                        str(duration_s),
                        "--start-ns",
                        str(start_ns),
                        "--symbols",
                        str(cfg.symbols),
                        "--sender",
                        str(k),
                        "--senders",
                        str(n_senders),
                        "--trace-sample-rate",
                        str(cfg.trace_sample_rate),
                        "--trace-max-per-second",
                        str(cfg.trace_max_per_second),
                    ],
                    env=self._env(),
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                for k in range(n_senders)
            ]
            cpu: dict[str, float] = {}

            def sample() -> None:  # CPU at the end of the warm-up, and when the load ends
                time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9 + cfg.warmup_s))
                cpu["start"] = _cpu_seconds(proc.pid)
                time.sleep(max(0.0, duration_s - cfg.warmup_s))
                cpu["end"] = _cpu_seconds(proc.pid)

            sampler = threading.Thread(target=sample)
            sampler.start()
            lags = [float(s.communicate()[0].split("worst_lag_ms=")[1]) for s in senders]
            sampler.join()
            beside.close()
            sink.wait()
            rss = _rss_mb(proc.pid)
            dead = self._dead_letters()
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited early with {proc.returncode}")
        data = np.load(out)
        result = self._figures(kind, rate, duration_s, start_ns, data, cpu, rss, max(lags))
        result["dead_letters"] = dead  # explains any 'lost' signal: a tick dead-lettered has none
        if result["lost"]:
            # read the whole topic again: tells a signal never produced from one the
            # sink's consumer did not get (the local broker's fetch stalls, BROKER.md)
            result["lost_on_reread"] = self._lost_on_reread(sink_topic, data["trade_id"], expected)
        return result

    def _reader(self) -> Any:
        """A plain aiokafka consumer of this run's broker (assign, then read from the start)."""
        from aiokafka import AIOKafkaConsumer

        security = self.settings.kafka_security.aiokafka_kwargs()
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,
            **security,
        )

    def _lost_on_reread(self, topic: str, seen: np.ndarray, expected: int) -> int:
        """Trade ids in 0..expected that neither the sink nor a fresh read of `topic` saw."""
        import asyncio

        import orjson
        from aiokafka import TopicPartition

        async def read() -> set[int]:
            consumer = self._reader()
            await consumer.start()
            ids: set[int] = set()
            try:
                parts = [TopicPartition(topic, p) for p in range(self.config.partitions)]
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                while batches := await consumer.getmany(timeout_ms=3000, max_records=20_000):
                    for msgs in batches.values():
                        ids.update(int(orjson.loads(m.value)["trade_id"]) for m in msgs)
            finally:
                await consumer.stop()
            return ids

        found = asyncio.run(read()) | set(seen.tolist())
        return len(set(range(expected)) - found)

    def _dead_letters(self) -> dict[str, int]:
        """Dead letters of the run by reason (the echo floor has none)."""
        import asyncio
        from collections import Counter

        from aiokafka import TopicPartition

        async def read() -> dict[str, int]:
            consumer = self._reader()
            await consumer.start()
            reasons: Counter[str] = Counter()
            try:
                parts = [TopicPartition(self.dlq, p) for p in range(self.config.partitions)]
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                while batches := await consumer.getmany(timeout_ms=1000):
                    for msgs in batches.values():
                        for m in msgs:
                            reasons[dict(m.headers).get("reason", b"?").decode()] += 1
            finally:
                await consumer.stop()
            return dict(reasons)

        return asyncio.run(read())

    def _figures(self, kind: str, rate: float, duration_s: float, start_ns: int, data: Any,
                 cpu: dict[str, float], rss: float, lag_ms: float) -> dict[str, Any]:  # fmt: skip
        cfg = self.config
        expected = int(rate * duration_s)
        ids = data["trade_id"]
        distinct = len(np.unique(ids))
        window = data["sent_ns"] >= start_ns + int(cfg.warmup_s * 1e9)
        latency = (data["arrived_ns"] - data["sent_ns"])[window] / 1e6
        measured = int(window.sum())
        third = max(len(latency) // 3, 1)
        result: dict[str, Any] = {
            "system": kind, "rate": rate, "duration_s": duration_s, "expected": expected,
            "received": len(ids), "lost": expected - distinct, "duplicates": len(ids) - distinct,
            "latency_ms": _pct(latency), "sender_worst_lag_ms": lag_ms,
            "lag_growth": float(np.median(latency[-third:]) / max(np.median(latency[:third]),
                                                                  1e-9)) if measured else None,
            "cpu_us_per_tick": (cpu["end"] - cpu["start"]) / max(measured, 1) * 1e6,
            "_cpu_s": cpu["end"] - cpu["start"], "_measured": measured,
            "cpu_percent": (cpu["end"] - cpu["start"]) / (duration_s - cfg.warmup_s) * 100,
            "rss_mb": rss,
        }  # fmt: skip
        stages = data["stages_ns"]
        if len(stages):
            s = stages[window]
            parts = np.column_stack([
                s[:, 0] - data["sent_ns"][window], s[:, 1] - s[:, 0], s[:, 2] - s[:, 1],
                s[:, 3] - s[:, 2], s[:, 4] - s[:, 3], data["arrived_ns"][window] - s[:, 4],
            ]) / 1e6  # fmt: skip
            result["stages_ms"] = {n: _pct(parts[:, k]) for k, n in enumerate(STAGE_COLUMNS)}
            result["_service"] = (s[:, 4] - s[:, 0]) / 1e6
            result["service_ms"] = _pct(result["_service"])
            # micro-batches: signals of one batch share its "received" stamp
            batches = len(np.unique(s[:, 0]))
            result["micro_batches_per_s"] = batches / (duration_s - cfg.warmup_s)
            result["signals_per_micro_batch"] = len(s) / max(batches, 1)
            result["_latency"] = latency
            result["_stages"] = parts
            result["_batches"] = batches
        else:
            result["_latency"] = latency
        return result

    def close(self) -> None:
        """Stop the stack (and the OTLP receiver, counting the spans it received)."""
        if self.otlp is not None:
            self.otlp.terminate()
            out = self.otlp.communicate(timeout=30)[0]
            self.otlp_spans = int(out.rsplit("spans=", 1)[1]) if "spans=" in out else -1
        self._stop_tls()
        self.stack.down()


def _machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=False).stdout.strip()  # fmt: skip
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}  # fmt: skip


def _plot(
    floors: dict[str, dict[str, Any]], svc: dict[str, Any], path: Path, name: str = "tickserve"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = [(res, f"{floor} echo floor") for floor, res in floors.items()] + [(svc, name)]
    for res, label in lines:
        lat = np.sort(res["_latency"])
        if len(lat):
            ax1.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=label)
    ax1.set_xscale("log")
    ax1.set_xlabel("tick-to-signal latency (ms)")
    ax1.set_ylabel("fraction of ticks")
    ax1.set_title(f"latency CDF at {svc['rate']:,.0f} ticks/s")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    if "_stages" in svc:
        p50 = [float(np.percentile(svc["_stages"][:, k], 50)) for k in range(len(STAGE_COLUMNS))]
        p99 = [float(np.percentile(svc["_stages"][:, k], 99)) for k in range(len(STAGE_COLUMNS))]
        x = np.arange(len(STAGE_COLUMNS))
        ax2.bar(x - 0.2, p50, 0.4, label="p50")
        ax2.bar(x + 0.2, p99, 0.4, label="p99")
        ax2.set_xticks(x, STAGE_COLUMNS, rotation=20)
        ax2.set_yscale("log")
        ax2.set_ylabel("ms")
        ax2.set_title("tickserve stage breakdown")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if not k.startswith("_")}


def pool(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds as one measurement: percentiles over every round's ticks.

    Latency through the local broker comes in stalls that hit many consecutive ticks,
    so one run's p99 rests on a handful of them; rounds spread over time (each on a
    fresh broker, alternating with the floor) pool more of them. Counts add up, CPU
    per tick is total CPU over total ticks measured, RSS and lag are the worst round's.

    >>> a = {"system": "echo", "rate": 10.0, "duration_s": 5.0, "expected": 50,
    ...      "received": 50, "lost": 0, "duplicates": 0, "sender_worst_lag_ms": 2.0,
    ...      "lag_growth": 1.0, "cpu_percent": 10.0, "rss_mb": 90.0, "_cpu_s": 0.1,
    ...      "_measured": 40, "_latency": np.array([1.0, 2.0]), "dead_letters": {}}
    >>> b = dict(a, lost=1, rss_mb=95.0, _cpu_s=0.3, _latency=np.array([3.0, 4.0]))
    >>> p = pool([a, b])
    >>> p["rounds"], p["lost"], p["rss_mb"], p["cpu_us_per_tick"], p["latency_ms"]["max"]
    (2, 1, 95.0, 5000.0, 4.0)
    """
    if len(results) == 1:
        return results[0]
    first = results[0]

    def total(key: str) -> Any:
        return sum(r[key] for r in results)

    cpu_s, measured = total("_cpu_s"), total("_measured")
    latency = np.concatenate([r["_latency"] for r in results])
    dead: dict[str, int] = {}
    for r in results:
        for reason, n in r.get("dead_letters", {}).items():
            dead[reason] = dead.get(reason, 0) + n
    out: dict[str, Any] = {
        "system": first["system"], "rate": first["rate"], "duration_s": first["duration_s"],
        "rounds": len(results), "expected": total("expected"), "received": total("received"),
        "lost": total("lost"), "duplicates": total("duplicates"),
        "latency_ms": _pct(latency),
        "sender_worst_lag_ms": max(r["sender_worst_lag_ms"] for r in results),
        "lag_growth": max((r["lag_growth"] or 0.0) for r in results),
        "cpu_us_per_tick": cpu_s / max(measured, 1) * 1e6,
        "cpu_percent": total("cpu_percent") / len(results),
        "rss_mb": max(r["rss_mb"] for r in results), "dead_letters": dead,
        "_cpu_s": cpu_s, "_measured": measured, "_latency": latency,
    }  # fmt: skip
    if any("lost_on_reread" in r for r in results):
        out["lost_on_reread"] = sum(r.get("lost_on_reread", 0) for r in results)
    if all("_stages" in r for r in results):
        stages = np.concatenate([r["_stages"] for r in results])
        service = np.concatenate([r["_service"] for r in results])
        batches = total("_batches")
        out["stages_ms"] = {n: _pct(stages[:, k]) for k, n in enumerate(STAGE_COLUMNS)}
        out["service_ms"] = _pct(service)
        out["micro_batches_per_s"] = total("micro_batches_per_s") / len(results)
        out["signals_per_micro_batch"] = len(service) / max(batches, 1)
        out.update(_stages=stages, _service=service, _batches=batches)
    return out


def _ratios(floor: dict[str, Any], svc: dict[str, Any]) -> dict[str, float]:
    """Latency percentiles and CPU per tick of `svc` over `floor` (< 1: svc lower)."""
    out = {q: svc["latency_ms"][q] / floor["latency_ms"][q] for q in floor["latency_ms"]}
    out["cpu_per_tick"] = svc["cpu_us_per_tick"] / max(floor["cpu_us_per_tick"], 1e-9)
    return out


def fastest_independent(floors: dict[str, dict[str, Any]]) -> str | None:
    """The independent floor with the lowest p99 (the one `make bench-ci` gates on).

    >>> fastest_independent({"aiokafka": {"latency_ms": {"p99": 9.0}},
    ...                      "confluent": {"latency_ms": {"p99": 7.0}},
    ...                      "echo": {"latency_ms": {"p99": 5.0}}})
    'confluent'
    """
    independent = [name for name in INDEPENDENT if name in floors]
    if not independent:
        return None
    return min(independent, key=lambda name: floors[name]["latency_ms"]["p99"])


def run_e2e(config: E2EConfig) -> Path:
    """Run the benchmark; write JSON and PNG under config.out_dir; return the JSON path."""
    unknown = set(config.floors) - set(FLOORS)
    if unknown or not config.floors:
        raise ValueError(f"floors must be some of {sorted(FLOORS)}, not {config.floors}")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in config.floors}
    systems: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tickserve-bench-") as tmp:
        bench = Bench(config, Path(tmp))
        try:
            for _ in range(max(config.rounds, 1)):
                for name in config.floors:
                    rounds[name].append(bench.measure(name, config.rate, config.duration_s))
                systems.append(bench.measure(config.against, config.rate, config.duration_s))
            sweep = []
            for rate in config.sweep:
                for kind in ("echo", "tickserve"):
                    res = bench.measure(kind, rate, min(config.duration_s, 12.0))
                    sweep.append(_public(res))
        finally:
            bench.close()
    floors = {name: pool(results) for name, results in rounds.items()}
    svc = pool(systems)
    fastest = fastest_independent(floors)
    # "floor": the one the ratios of older reports (and `compare`) were over
    floor = floors["echo"] if "echo" in floors else floors[fastest or config.floors[0]]
    report: dict[str, Any] = {
        "machine": _machine(), "config": {k: str(v) for k, v in asdict(config).items()},
        "floors": {name: _public(res) for name, res in floors.items()},
        "ratio_over": {name: _ratios(res, svc) for name, res in floors.items()},
        "fastest_independent": fastest,
        "floor": _public(floor), "tickserve": _public(svc), "ratio_over_floor": _ratios(floor, svc),
        "sweep": sweep, "max_sustainable": _max_rates(sweep, config.p99_bound_ms),
        "otlp_spans": bench.otlp_spans,
    }  # fmt: skip
    if len(systems) > 1:
        report["rounds"] = [
            {
                "floors": {name: _public(rounds[name][k]) for name in rounds},
                "tickserve": _public(t),
                "ratio_over": {name: _ratios(rounds[name][k], t) for name in rounds},
            }
            for k, t in enumerate(systems)
        ]
    path = config.out_dir / f"e2e-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    _plot(floors, svc, path.with_suffix(".png"),
          "echo again" if config.against == "echo" else "tickserve")  # fmt: skip
    return path


def _max_rates(sweep: list[dict[str, Any]], bound_ms: float) -> dict[str, float | None]:
    best: dict[str, float | None] = {"echo": None, "tickserve": None}
    for res in sweep:
        ok = (res["lost"] == 0 and res["latency_ms"]["p99"] < bound_ms
              and (res["lag_growth"] or 0) < 2.0)  # fmt: skip
        if ok and (best[res["system"]] or 0) < res["rate"]:
            best[res["system"]] = res["rate"]
    return best


def _line(name: str, res: dict[str, Any]) -> str:
    lat = res["latency_ms"]
    return (
        f"  {name:<16} p50={lat['p50']:.1f} p90={lat['p90']:.1f} p99={lat['p99']:.1f} "
        f"p99.9={lat['p99.9']:.1f} max={lat['max']:.1f} ms  lost={res['lost']} "
        f"(on re-read {res.get('lost_on_reread', 0)}) "
        f"dup={res['duplicates']} dlq={res.get('dead_letters', {})} "
        f"cpu={res['cpu_us_per_tick']:.1f} us/tick "
        f"({res['cpu_percent']:.0f}%) rss={res['rss_mb']:.0f} MB"
    )


def summary(path: Path) -> str:
    """Human-readable lines of one report."""
    rep = json.loads(path.read_text())
    t = rep["tickserve"]
    floors = rep.get("floors", {"echo": rep["floor"]})
    ratios = rep.get("ratio_over", {"echo": rep["ratio_over_floor"]})
    rounds = rep.get("rounds", [])
    each = f" x {len(rounds)} rounds (pooled)" if rounds else ""
    lines = [f"e2e at {t['rate']:,.0f} ticks/s for {t['duration_s']:g} s{each}, "
             f"{rep['machine']['cpus']} CPUs, commit {rep['machine']['git_commit']}"]  # fmt: skip
    config = rep.get("config", {})
    lines[0] += f", {config.get('partitions', '?')} partitions"
    priority = int(config.get("realtime_priority", 0))  # stored as text
    if priority:
        lines[0] += f", stream threads SCHED_FIFO {priority}"
    sampled = float(config.get("trace_sample_rate", 0))
    if sampled:
        cap = float(config.get("trace_max_per_second", 0))
        at_most = f", at most {cap:g}/s" if cap else ""
        lines[0] += (
            f", tracing on at {sampled:g}{at_most} ({rep.get('otlp_spans', 0)} spans exported)"
        )
    if config.get("tls") == "True":
        lines[0] += ", TLS (stunnel in front of the broker)"
    second = "echo again" if config.get("against") == "echo" else "tickserve"
    for name, res in floors.items():
        lines.append(_line(f"{name} floor", res))
    lines.append(_line(second, t))
    fastest = rep.get("fastest_independent")
    for name, r in ratios.items():
        mark = " (fastest independent: the gate)" if name == fastest else ""
        lines.append(
            f"  over {name:<10} p50={r['p50']:.2f} p99={r['p99']:.2f} "
            f"cpu/tick={r.get('cpu_per_tick', float('nan')):.2f}{mark}"
        )
    for k, one in enumerate(rounds, 1):
        parts = [
            f"{name} p99={res['latency_ms']['p99']:.1f} cpu={res['cpu_us_per_tick']:.1f}"
            for name, res in one.get("floors", {}).items()
        ]
        line = (
            f"    round {k}: tickserve p99={one['tickserve']['latency_ms']['p99']:.1f} ms "
            f"cpu={one['tickserve']['cpu_us_per_tick']:.1f} us/tick; " + ", ".join(parts)
        )
        if "service_ms" in one["tickserve"]:  # the echo floors have no stage header
            line += f"; service p99={one['tickserve']['service_ms']['p99']:.3f} ms"
        lines.append(line)
    if "service_ms" in t:
        s = t["service_ms"]
        lines.append(f"  in-process service time: p50={s['p50']:.3f} p99={s['p99']:.3f} "
                     f"max={s['max']:.3f} ms; {t['micro_batches_per_s']:.0f} micro-batches/s, "
                     f"{t['signals_per_micro_batch']:.0f} signals each")  # fmt: skip
        lines.append("  stages p50/p99 ms: " + ", ".join(
            f"{k}={v['p50']:.3f}/{v['p99']:.3f}" for k, v in t["stages_ms"].items()))  # fmt: skip
    for res in rep["sweep"]:
        lat = res["latency_ms"]
        lines.append(f"  sweep {res['system']:<9} {res['rate']:>8,.0f}/s p99={lat['p99']:.1f} ms "
                     f"lost={res['lost']} growth={res['lag_growth']:.2f} "
                     f"cpu={res['cpu_us_per_tick']:.1f} us/tick")  # fmt: skip
    if rep["sweep"]:
        lines.append(f"  max sustainable: {rep['max_sustainable']}")
    return "\n".join(lines)


def compare(a: Path, b: Path) -> str:
    """Differences between two reports (B relative to A)."""
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    lines = [f"{a.name} -> {b.name}"]
    for system in ("floor", "tickserve"):
        for q, va in ra[system]["latency_ms"].items():
            vb = rb[system]["latency_ms"][q]
            lines.append(f"  {system:<9} latency {q:<6} {va:9.2f} -> {vb:9.2f} ms "
                         f"({(vb / va - 1) * 100:+.0f}%)")  # fmt: skip
        for key in ("cpu_us_per_tick", "rss_mb", "lost", "duplicates"):
            va, vb = ra[system][key], rb[system][key]
            lines.append(f"  {system:<9} {key:<15} {va:9.2f} -> {vb:9.2f}")
    for q, va in ra["ratio_over_floor"].items():
        lines.append(f"  ratio {q:<6} {va:.2f} -> {rb['ratio_over_floor'][q]:.2f}")
    return "\n".join(lines)
