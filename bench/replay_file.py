"""A large ccxt trade CSV for replays: the shared real trades, repeated with shifted time and ids.

python -m bench.replay_file /tmp/h21/XRP_ETH-trades-5m.csv --rows 5000000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "freqtrade"


def write(out: Path, rows: int, source: Path = SOURCE / "XRP_ETH-trades.parquet") -> int:
    """Write `rows` ccxt trade rows to `out` (CSV) and return how many were written."""
    src = pd.read_parquet(source)
    span = int(src["timestamp"].iloc[-1] - src["timestamp"].iloc[0]) + 1
    written, k = 0, 0
    with out.open("w") as fh:
        while written < rows:
            part = src.head(min(len(src), rows - written)).copy()
            part["timestamp"] = part["timestamp"] + k * span
            part["id"] = part["id"].astype(np.int64) + k * 10_000_000
            part.to_csv(fh, index=False, header=(k == 0))
            written, k = written + len(part), k + 1
    return written


def main() -> None:
    """Command line: output path and row count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="name it BASE_QUOTE-trades*.csv for the symbol")
    parser.add_argument("--rows", type=int, default=5_000_000)
    args = parser.parse_args()
    print(write(args.out, args.rows))


if __name__ == "__main__":
    main()
