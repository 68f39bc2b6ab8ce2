"""Import + features for N synthetic ticks, and `tickserve train` end to end on the real data.

    .venv/bin/python -m bench.import_features [--ticks 10000000] [--train]

Prints wall seconds per step (fixed seed; run it twice, on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "freqtrade" / "XRP_ETH-trades.parquet"


def synthetic_trades(path: Path, n: int, symbols: int = 10, seed: int = 7) -> None:
    """A ccxt trade file: N trades over `symbols` random walks, ~2 per second each."""
    rng = np.random.default_rng(seed)
    chunk = 1_000_000
    start_ms = 1_700_000_000_000
    writer = None
    prices = 100.0 * np.exp(rng.normal(0, 0.5, symbols))
    names = np.array([f"SYN{i:03d}/USD" for i in range(symbols)])
    t = start_ms
    for lo in range(0, n, chunk):
        k = min(chunk, n - lo)
        sym = rng.integers(0, symbols, k)
        steps = np.exp(rng.normal(0, 2e-4, k))
        price = np.empty(k)
        for s in range(symbols):  # per-symbol random walk
            mine = sym == s
            walk = prices[s] * np.cumprod(steps[mine])
            price[mine] = walk
            if len(walk):
                prices[s] = walk[-1]
        ts = t + np.cumsum(rng.integers(0, 100, k))
        t = int(ts[-1])
        table = pa.table({
            "symbol": names[sym], "timestamp": ts.astype(np.int64),
            "id": np.char.add("t", np.arange(lo, lo + k).astype(str)), "type": ["market"] * k,
            "side": np.where(rng.random(k) < 0.5, "buy", "sell"), "price": np.round(price, 6),
            "amount": np.round(rng.exponential(1.0, k), 6),
        })  # fmt: skip
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def bench_import_features(n: int) -> None:
    from features.spec import FeatureSpec
    from stream.ingest.archive import ClickHouseArchive
    from stream.ingest.backfill import import_file
    from training.dataset import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        trades = Path(tmp) / "trades.parquet"
        synthetic_trades(trades, n)
        archive = ClickHouseArchive.open(f"chdb://{tmp}/clickhouse")
        t0 = time.perf_counter()
        report = import_file(archive, trades)
        t1 = time.perf_counter()
        ticks = archive.read_ticks()
        t2 = time.perf_counter()
        ds = build_dataset(ticks, FeatureSpec())
        t3 = time.perf_counter()
        print(f"import {report.inserted} ticks: {t1 - t0:.1f} s "
              f"({report.inserted / (t1 - t0):,.0f} ticks/s)")  # fmt: skip
        print(f"read back ordered: {t2 - t1:.1f} s; features + labels ({len(ds)} rows): "
              f"{t3 - t2:.1f} s")  # fmt: skip
        print(f"import + features: {t3 - t0:.1f} s for {n:,} ticks")


def bench_train() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "MLFLOW_"))}
        env = {**clean, "TICKSERVE_STATE_DIR": tmp}
        cli = [sys.executable, "-m", "deploy.cli"]
        t0 = time.perf_counter()
        subprocess.run([*cli, "import", "--input", str(REAL)], env=env, cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        t1 = time.perf_counter()
        subprocess.run([*cli, "train"], env=env, cwd=ROOT, check=True, capture_output=True)
        t2 = time.perf_counter()
        print(f"real data: tickserve import {t1 - t0:.1f} s, tickserve train {t2 - t1:.1f} s "
              f"(params.yaml), end to end {t2 - t0:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=10_000_000)
    parser.add_argument("--train", action="store_true", help="also time tickserve train")
    args = parser.parse_args()
    bench_import_features(args.ticks)
    if args.train:
        bench_train()


if __name__ == "__main__":
    main()
