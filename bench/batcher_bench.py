"""MicroBatcher benchmarks: overhead over a bare session.run, HGB-200 throughput, swap pause.

Run: `.venv/bin/python -m bench.batcher_bench` (fixed seeds; percentiles, not means).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from features.spec import FeatureSpec
from inference.batcher import BatcherConfig, MicroBatcher
from inference.registry import LoadedModel
from inference.session import OnnxScorer
from inference.testing import golden_for, loaded, make_onnx_classifier, synthetic_rows
from inference.validation import GoldenRows, ValidationPolicy, validate

N_FEATURES = FeatureSpec().n_features


class Timed:
    """Wraps an InferenceSession (`run`) or a TreeKernel (`score`); records the last call's ns."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last_ns = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter_ns()
        out = self.inner.run(*args, **kwargs)
        self.last_ns = time.perf_counter_ns() - started
        return out

    def score(self, rows: np.ndarray) -> np.ndarray:
        started = time.perf_counter_ns()
        out = self.inner.score(rows)
        self.last_ns = time.perf_counter_ns() - started
        return out  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _pct(values: np.ndarray | list[float], scale: float = 1.0) -> str:
    a = np.asarray(values, np.float64) * scale
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return f"p50={p50:.1f} p90={p90:.1f} p99={p99:.1f} p99.9={p999:.1f} max={a.max():.1f}"


def _timed_model(model: LoadedModel) -> tuple[LoadedModel, Timed]:
    """The model with whatever scores its rows (session or tree kernel) timed per call."""
    s = model.scorer
    if s.trees is not None:
        timed = Timed(s.trees)
        scorer = OnnxScorer(s.session, s.input_name, s.prob_output, s.provider, timed)  # type: ignore[arg-type]
    else:
        timed = Timed(s.session)
        scorer = OnnxScorer(timed, s.input_name, s.prob_output, s.provider)  # type: ignore[arg-type]
    return LoadedModel(model.name, model.version, model.alias, model.spec_hash, scorer,
                       model.loaded_at_ns), timed  # fmt: skip


def bench_overhead(onnx: bytes, label: str, iters: int, numba_kernels: bool = False) -> None:
    """Batcher time per batch minus the time inside the scoring call of that same batch.

    The bare call is `session.run` (ONNX Runtime) or `TreeKernel.score` (tree kernel).
    """
    model, timed = _timed_model(loaded(onnx, N_FEATURES, numba_kernels=numba_kernels))
    engine = model.scorer.engine
    bare_call = "session.run" if engine == "onnxruntime" else "kernel.score"
    for batch in (1, 100, 1000):
        batcher = MicroBatcher(model, N_FEATURES, BatcherConfig(max_batch=max(batch, 1000)))
        X, _ = synthetic_rows(batch, N_FEATURES, seed=3)
        X64 = X.astype(np.float64)  # what the worker hands over
        origin = np.full(batch, time.time_ns(), np.int64)
        feed = {model.scorer.input_name: X}
        out = [model.scorer.prob_output]

        def bare_run(out: list[str] = out, feed: dict[str, Any] = feed, X: Any = X) -> None:
            if engine == "onnxruntime":
                timed.inner.run(out, feed)
            else:
                timed.inner.score(X)

        for _ in range(200):  # warm up both paths
            batcher.score_batch(X64, origin)
            bare_run()
        overhead, bare = np.empty(iters), np.empty(iters)
        for i in range(iters):
            started = time.perf_counter_ns()
            batcher.score_batch(X64, origin)
            overhead[i] = time.perf_counter_ns() - started - timed.last_ns
            started = time.perf_counter_ns()
            bare_run()
            bare[i] = time.perf_counter_ns() - started
        tag = f"{label} ({engine})"
        print(f"overhead  {tag:<24} batch={batch:<5} batcher over {bare_call} us: "
              f"{_pct(overhead, 1e-3)}")  # fmt: skip
        print(f"bare call {tag:<24} batch={batch:<5} {bare_call} us: {_pct(bare, 1e-3)}")


def bench_throughput(
    onnx: bytes, seconds: float, threads: int = 1, numba_kernels: bool = True
) -> None:
    """Rows/s through score_batch at batch 1000 (200-tree HistGradientBoosting)."""
    model = loaded(onnx, N_FEATURES, threads=threads, numba_kernels=numba_kernels)
    batcher = MicroBatcher(model, N_FEATURES, BatcherConfig(max_batch=1000))
    X, _ = synthetic_rows(1000, N_FEATURES, seed=5)
    X64 = X.astype(np.float64)
    origin = np.full(1000, time.time_ns(), np.int64)
    for _ in range(20):
        batcher.score_batch(X64, origin)
    per_batch = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter_ns()
        batcher.score_batch(X64, origin)
        per_batch.append(time.perf_counter_ns() - t0)
    total = time.perf_counter() - started
    rows_s = 1000 * len(per_batch) / total
    engine = model.scorer.engine
    if engine == "onnxruntime":
        engine += f" threads={threads}"
    print(f"throughput hgb-200 batch=1000 {engine}: {rows_s:,.0f} rows/s over "
          f"{len(per_batch)} batches; per batch ms: {_pct(per_batch, 1e-6)}")  # fmt: skip


class _ClosingBatcher(MicroBatcher):
    """A MicroBatcher that notes when each queued batch closes and how long it took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closes: list[tuple[int, int, int]] = []  # (closed at ns, rows, compute ns)

    def _flush_queue(self) -> None:
        rows = len(self._waiters)
        started = time.perf_counter_ns()
        super()._flush_queue()
        if rows:
            self.closes.append((started, rows, time.perf_counter_ns() - started))


@dataclass
class QueueRun:
    waits_ns: np.ndarray  # per row: submitted -> its batch closed
    totals_ns: np.ndarray  # per row: submitted -> its future resolved (compute included)
    compute_ns: np.ndarray  # per batch: scoring and answering its rows
    rows_per_batch: np.ndarray


async def _queue_run(onnx: bytes, rate: float, seconds: float, max_delay_us: int) -> QueueRun:
    """Single rows offered at `rate` rows/s through submit_row."""
    batcher = _ClosingBatcher(loaded(onnx, N_FEATURES), N_FEATURES,
                              BatcherConfig(max_batch=1000, max_delay_us=max_delay_us))  # fmt: skip
    X, _ = synthetic_rows(1024, N_FEATURES, seed=13)
    n_rows = int(rate * seconds)
    queued = np.zeros(n_rows, np.int64)
    done = np.zeros(n_rows, np.int64)

    def finished(i: int) -> Any:
        return lambda _: done.__setitem__(i, time.perf_counter_ns())

    start = time.perf_counter_ns()
    sent = 0
    while sent < n_rows:
        due = min(n_rows, int((time.perf_counter_ns() - start) * rate / 1e9) + 1)
        while sent < due:
            queued[sent] = time.perf_counter_ns()
            batcher.submit_row(X[sent % 1024]).add_done_callback(finished(sent))
            sent += 1
        await asyncio.sleep(0)  # an always-busy loop, like a worker under load
    while batcher._waiters:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    closed, rows, compute = (np.array(c, np.int64) for c in zip(*batcher.closes, strict=True))
    closed_per_row = np.repeat(closed, rows)  # rows join batches in the order they came
    return QueueRun(closed_per_row - queued, done - queued, compute, rows)


def bench_queue_wait(onnx: bytes, label: str, rate: float, seconds: float) -> None:
    """p99 queue wait of single rows against max_delay_us + one batch's compute (p99)."""
    for max_delay_us in (500, 2000):
        for runner in ("asyncio", "uvloop"):
            coro = _queue_run(onnx, rate, seconds, max_delay_us)
            if runner == "uvloop":
                import uvloop

                got = uvloop.run(coro)
            else:
                got = asyncio.run(coro)
            skip = len(got.waits_ns) // 10  # warm-up
            waits, totals = got.waits_ns[skip:], got.totals_ns[skip:]
            compute_p99 = float(np.percentile(got.compute_ns, 99)) / 1e3
            bound = max_delay_us + compute_p99
            wait_p99 = float(np.percentile(waits, 99)) / 1e3
            print(f"queue wait {label:<9} {rate:,.0f} rows/s max_delay_us={max_delay_us:<5} "
                  f"{runner:<7} us: {_pct(waits, 1e-3)}; batch compute p99 {compute_p99:.0f} "
                  f"(~{np.median(got.rows_per_batch):.0f} rows) -> p99 wait {wait_p99:.0f} vs "
                  f"bound {bound:.0f} {'ok' if wait_p99 <= bound else 'OVER'}; "
                  f"submit->answer p99 {np.percentile(totals, 99) / 1e3:.0f}")  # fmt: skip


async def _wait_until(due: float) -> None:
    """Hold the loop until perf_counter() reaches `due`, yielding to other tasks.

    Sleeps until about 1 ms before, then spins on sleep(0): timers alone oversleep by
    up to a few ms on this VM, which would drown the pause being measured. The loop is
    then always busy, like a worker's under load.
    """
    ahead = due - time.perf_counter()
    if ahead > 0.0015:
        await asyncio.sleep(ahead - 0.001)
    while time.perf_counter() < due:
        await asyncio.sleep(0)


@dataclass
class SwapRun:
    gaps_ns: np.ndarray
    window: tuple[int, int]  # indices of gaps between load start and swap + 10 batches


async def _swap_run(current: bytes, new: bytes, rate_hz: float, batch: int) -> SwapRun:
    """Batches at a fixed rate on the loop; a new model is loaded and checked in a thread
    (as ModelWatcher does) and swapped in between two batches."""
    loop = asyncio.get_running_loop()
    batcher = MicroBatcher(loaded(current, N_FEATURES, "1"), N_FEATURES, BatcherConfig(1000))
    X, _ = synthetic_rows(batch, N_FEATURES, seed=9)
    origin = np.full(batch, time.time_ns(), np.int64)
    golden = GoldenRows.parse(orjson.dumps(golden_for(new, N_FEATURES)), N_FEATURES)
    done_at: list[int] = []
    marks: dict[str, int] = {}

    def load_and_check() -> LoadedModel:
        model = loaded(new, N_FEATURES, "2")
        validate(model.scorer, golden, ValidationPolicy(), None)
        return model

    async def swapper() -> None:
        await asyncio.sleep(1.0)
        marks["load"] = len(done_at)
        model = await loop.run_in_executor(None, load_and_check)
        batcher.swap(model)
        marks["swap"] = len(done_at)

    task = asyncio.create_task(swapper())
    period = 1.0 / rate_hz
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < 3.0:
        n += 1
        await _wait_until(start + n * period)
        batcher.score_batch(X, origin)
        done_at.append(time.perf_counter_ns())
    await task
    gaps = np.diff(np.array(done_at))
    return SwapRun(gaps, (marks["load"], marks["swap"] + 10))


def bench_swap(current: bytes, new: bytes) -> None:
    """Swap pause: longest gap between consecutive batches around a swap, minus the usual gap."""
    import logging

    logging.getLogger("inference").setLevel(logging.WARNING)
    for rate, batch in ((1000.0, 50), (200.0, 1000)):
        run = asyncio.run(_swap_run(current, new, rate, batch))
        lo, hi = run.window
        normal = float(np.median(run.gaps_ns))
        during = run.gaps_ns[max(lo - 1, 0) : hi]
        pause = (during.max() - normal) / 1e6
        outside = np.concatenate([run.gaps_ns[: max(lo - 1, 0)], run.gaps_ns[hi:]])
        print(f"swap pause batches@{rate:.0f}/s x{batch} rows: max gap during load+swap "
              f"{during.max() / 1e6:.3f} ms, normal gap {normal / 1e6:.3f} ms -> pause "
              f"{pause:.3f} ms (outside the swap: max gap {outside.max() / 1e6:.3f} ms, "
              f"{len(during)} gaps in the window)")  # fmt: skip


class _AliasMover:
    """A child process that moves MLflow aliases on request, as a CI job would."""

    SCRIPT = (
        "import sys\n"
        "from mlflow.tracking import MlflowClient\n"
        "client = MlflowClient(tracking_uri=sys.argv[1], registry_uri=sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    alias, version = line.split()\n"
        "    client.set_registered_model_alias(sys.argv[2], alias, version)\n"
    )

    def __init__(self, uri: str, name: str) -> None:
        import subprocess

        argv = [sys.executable, "-c", self.SCRIPT, uri, name]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def move(self, alias: str, version: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{alias} {version}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def _registry_swap_run(uri: str, name: str, versions: list[str]) -> dict[str, Any]:
    """Batches at 1000/s x 50 rows while the real ModelWatcher follows alias moves."""
    from features.spec import FeatureSpec
    from inference.watcher import ModelWatcher, WatcherConfig

    spec = FeatureSpec()
    watcher = ModelWatcher(WatcherConfig(uri, name, poll_interval_s=0.05, prefer_gpu=False),
                           spec)  # fmt: skip
    batcher = MicroBatcher(watcher.load_initial(), N_FEATURES, BatcherConfig(1000))
    mover = _AliasMover(uri, name)  # in production the alias moves in another process
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(batcher, stop))
    X, _ = synthetic_rows(50, N_FEATURES, seed=9)
    origin = np.full(50, time.time_ns(), np.int64)
    moves = {1.5: versions[1], 3.5: versions[0]}  # a new version, then the rollback
    moved_at: list[int] = []
    done_at: list[int] = []
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < 5.5:
        n += 1
        await _wait_until(start + n * 0.001)
        for at in [t for t in moves if time.perf_counter() - start >= t]:
            version = moves.pop(at)
            moved_at.append(time.time_ns())
            mover.move("champion", version)
        batcher.score_batch(X, origin)
        done_at.append(time.time_ns())
    stop.set()
    await task
    mover.close()
    return {"done": np.array(done_at), "moved": moved_at,
            "swapped": [e.at_ns for e in watcher.history]}  # fmt: skip


def bench_registry_swap(current: bytes, new: bytes) -> None:
    """Swap pause through MLflow (sqlite): resolve, download, check in a thread, swap."""
    import logging
    import tempfile

    from features.spec import FeatureSpec
    from inference.testing import register_version

    logging.getLogger("inference").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        spec_hash = FeatureSpec().hash
        v1 = register_version(uri, "bench", current, spec_hash, golden_for(current, N_FEATURES),
                              alias="champion")  # fmt: skip
        v2 = register_version(uri, "bench", new, spec_hash, golden_for(new, N_FEATURES))
        got = asyncio.run(_registry_swap_run(uri, "bench", [v1, v2]))
    done, gaps = got["done"], np.diff(got["done"])
    normal = float(np.median(gaps))
    for label, moved, swapped in zip(("new version", "rollback"), got["moved"], got["swapped"],
                                     strict=True):  # fmt: skip
        lo = int(np.searchsorted(done, moved))
        hi = int(np.searchsorted(done, swapped)) + 10
        worst = gaps[lo:hi].max()
        print(f"registry swap ({label}): alias move -> serving {(swapped - moved) / 1e6:.1f} ms; "
              f"max gap {worst / 1e6:.3f} ms vs normal {normal / 1e6:.3f} ms -> pause "
              f"{(worst - normal) / 1e6:.3f} ms")  # fmt: skip
    quiet = np.concatenate([gaps[: np.searchsorted(done, got["moved"][0])]])
    print(f"registry polls every 50 ms, no move: batch gaps ms {_pct(quiet, 1e-6)}")


def main() -> None:
    """Run every benchmark once."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--switch-interval-us", type=int, default=500,
                        help="GIL switch interval, as the worker sets it (TICKSERVE_GIL_SWITCH_"
                             "INTERVAL_US); Python's own default is 5000")  # fmt: skip
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_interval_us / 1e6)
    print(f"GIL switch interval {sys.getswitchinterval() * 1e6:.0f} us")
    logistic = make_onnx_classifier(N_FEATURES, "logistic", seed=1)
    hgb = make_onnx_classifier(N_FEATURES, "hgb", seed=2, n_rows=20_000, max_iter=200,
                               early_stopping=False)  # fmt: skip
    hgb_next = make_onnx_classifier(N_FEATURES, "hgb", seed=3, n_rows=20_000, max_iter=200,
                                    early_stopping=False)  # fmt: skip
    gc.collect()
    gc.freeze()  # as `tickserve serve` does once it has started
    bench_overhead(logistic, "logistic", args.iters)
    bench_overhead(hgb, "hgb-200", args.iters)
    bench_overhead(hgb, "hgb-200", args.iters, numba_kernels=True)
    bench_throughput(hgb, args.seconds, numba_kernels=False)
    bench_throughput(hgb, args.seconds, threads=2, numba_kernels=False)
    bench_throughput(hgb, args.seconds)
    bench_queue_wait(logistic, "logistic", 50_000, 2.0)
    bench_queue_wait(hgb, "hgb-200", 50_000, 2.0)
    # a new version of the same model family, as a weekly retrain brings
    bench_swap(hgb, hgb_next)
    bench_registry_swap(hgb, hgb_next)


if __name__ == "__main__":
    main()
