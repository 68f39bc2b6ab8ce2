"""Feature benchmark: tickserve kernels vs talipp vs talib.stream, and online-store freshness.

Run: .venv/bin/python -m bench.features [--online] (fixed seeds; prints a table).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from features.engine import FeatureEngine
from features.spec import NS_PER_SECOND, FeatureSpec

SYMBOLS = 100


def synthetic(n: int, symbols: int = SYMBOLS, seed: int = 7) -> tuple[np.ndarray, ...]:
    """Interleaved ticks over `symbols`, 1 s bars, ~500 ticks/s in all."""
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, symbols, n).astype(np.int64)
    ts = np.cumsum(rng.integers(1, 4_000_000, n)).astype(np.int64)
    price = 60000.01 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    qty = rng.exponential(1.0, n)
    side = rng.random(n) < 0.5
    return slots, ts, price, qty, side


def pct(samples: list[float] | np.ndarray, q: float) -> float:
    """Percentile of `samples`."""
    return float(np.percentile(np.asarray(samples), q))


def bench_kernels(batch: int, n: int = 400_000) -> dict[str, float]:
    """ns per tick (amortized) for micro-batches of `batch` ticks over 100 symbols."""
    spec = FeatureSpec(bar_ns=NS_PER_SECOND)
    engine = FeatureEngine(spec)
    engine.slots([f"S{i}" for i in range(SYMBOLS)])
    slots, ts, price, qty, side = synthetic(n)
    warm = n // 4
    engine.update(slots[:warm], ts[:warm], price[:warm], qty[:warm], side[:warm])
    per_batch = []
    for i in range(warm, n - batch + 1, batch):
        j = i + batch
        t0 = time.perf_counter_ns()
        engine.update(slots[i:j], ts[i:j], price[i:j], qty[i:j], side[i:j])
        per_batch.append(time.perf_counter_ns() - t0)
        if len(per_batch) >= 20_000:
            break
    arr = np.asarray(per_batch, np.float64)
    return {
        "batch": batch,
        "ns_per_tick_p50": pct(arr, 50) / batch,
        "ns_per_tick_mean": float(arr.sum() / (len(arr) * batch)),
        "us_per_batch_p50": pct(arr, 50) / 1e3,
        "us_per_batch_p99": pct(arr, 99) / 1e3,
    }


def bench_talipp(n: int = 40_000) -> float:
    """ns per tick: talipp RSI(14) + BB(20) per symbol, open bar updated in place."""
    from talipp.indicators import BB, RSI

    slots, ts, price, _, _ = synthetic(n)
    rsi = [RSI(14) for _ in range(SYMBOLS)]
    bb = [BB(20, 2.0) for _ in range(SYMBOLS)]
    bar = [-1] * SYMBOLS
    t0 = time.perf_counter_ns()
    for k in range(n):
        s, b, p = int(slots[k]), int(ts[k] // NS_PER_SECOND), float(price[k])
        if b != bar[s]:
            rsi[s].add(p)
            bb[s].add(p)
            bar[s] = b
        else:
            rsi[s].update(p)
            bb[s].update(p)
        _ = (rsi[s][-1], bb[s][-1])
    return (time.perf_counter_ns() - t0) / n


def bench_talib_stream(n: int = 40_000, keep: int = 64) -> float:
    """ns per tick: talib.stream RSI + BBANDS over each symbol's last `keep` closes."""
    import talib.stream as ts_stream

    slots, ts, price, _, _ = synthetic(n)
    closes = [np.full(keep, price[0]) for _ in range(SYMBOLS)]
    bar = [-1] * SYMBOLS
    t0 = time.perf_counter_ns()
    for k in range(n):
        s, b, p = int(slots[k]), int(ts[k] // NS_PER_SECOND), float(price[k])
        c = closes[s]
        if b != bar[s]:
            c[:-1] = c[1:]
            bar[s] = b
        c[-1] = p
        _ = (ts_stream.RSI(c, 14), ts_stream.BBANDS(c, 20, 2.0, 2.0, 0))
    return (time.perf_counter_ns() - t0) / n


def bench_online(
    rate: float = 2000.0, seconds: float = 10.0, symbols: int = 2000
) -> dict[str, float]:
    """Offer `rate` symbol updates/s through OnlineWriter to a local Valkey; freshness."""
    import tempfile
    from pathlib import Path

    from deploy.settings import Settings
    from deploy.stack import LocalStack, free_port
    from features.online import OnlineWriter, open_store

    spec = FeatureSpec()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp), valkey_port=free_port(), redis_url=None)
        stack = LocalStack(settings)
        stack.start_redis()
        try:
            writer = OnlineWriter(open_store(settings.redis, settings.feast_registry), spec,
                                  interval_s=0.005).start()  # fmt: skip
            names = [f"SYM{i:05d}" for i in range(symbols)]
            rng = np.random.default_rng(1)
            step = 0.01
            per_step = int(rate * step)
            start = time.monotonic()
            k = 0
            while time.monotonic() - start < seconds:
                batch = [names[(k + j) % symbols] for j in range(per_step)]
                k += per_step
                values = rng.normal(size=(per_step, spec.n_features))
                writer.offer(batch, np.full(per_step, time.time_ns()), values)
                time.sleep(max(0.0, start + (k / per_step) * step - time.monotonic()))
            writer.close()
            fresh = np.asarray(writer.freshness_ns, np.float64) / 1e6
            return {
                "offered_per_s": k / seconds,
                "written_rows": writer.flushed_rows,
                "freshness_ms_p50": pct(fresh, 50),
                "freshness_ms_p99": pct(fresh, 99),
                "freshness_ms_max": float(fresh.max()),
            }
        finally:
            stack.down()


def main() -> None:
    """Print the figures the features issue asks for."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--online", action="store_true", help="also the Feast/Redis writer")
    args = parser.parse_args()
    bench_kernels(1000, 50_000)  # JIT warm-up outside the figures
    for batch in (1, 100, 1000):
        r = bench_kernels(batch)
        print(
            f"tickserve 12 features, batch {batch:>4}: {r['ns_per_tick_p50']:8.1f} ns/tick p50 "
            f"({r['us_per_batch_p50']:.2f} us/batch p50, {r['us_per_batch_p99']:.2f} p99)"
        )
    ours = bench_kernels(1)["us_per_batch_p50"] * 1e3
    talipp = bench_talipp()
    talib_s = bench_talib_stream()
    for name, cost in (("talipp RSI+BB", talipp), ("talib.stream RSI+BBANDS", talib_s)):
        print(
            f"{name:<24} tick by tick: {cost:8.1f} ns/tick ({cost / ours:.1f}x tickserve batch 1)"
        )
    if args.online:
        r = bench_online()
        print("online store: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
