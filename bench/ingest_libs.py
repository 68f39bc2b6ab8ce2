"""ccxt against cryptofeed: Binance trade messages parsed per second and CPU per message.

The measurement behind the choice of library for `tickserve ingest`
(docs/architecture.md). Each library gets the messages its own Binance subscription
receives (ccxt: the raw `<symbol>@trade` stream; cryptofeed: the combined
`<symbol>@aggTrade` stream), as text, and turns them into its trade objects through
its own message handler, in process (no network). Rounds alternate between the
libraries, each in a fresh subprocess; medians are reported.

cryptofeed is not a tickserve dependency: install it in a scratch environment and
pass its interpreter.

    python -m bench.ingest_libs --cryptofeed-python /tmp/cf/bin/python --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MESSAGES = 50_000
ROOT = Path(__file__).resolve().parent.parent


def _trades(n: int) -> list[dict[str, object]]:
    base = 1_700_000_000_000
    return [
        {"s": "BTCUSDT", "t": 1000 + i, "p": f"{37000 + (i % 50) * 0.01:.2f}",
         "q": f"{0.001 * (1 + i % 7):.5f}", "T": base + i, "E": base + i, "m": i % 2 == 0,
         "M": True}
        for i in range(n)
    ]  # fmt: skip


def run_ccxt(n: int) -> tuple[float, float]:
    """Wall and CPU seconds for ccxt to parse `n` raw trade messages into unified trades."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    from stream.ingest.ccxt_adapter import open_exchange, spot_market

    async def main() -> tuple[float, float]:
        exchange = open_exchange("binance", print, lambda: None, "ws://127.0.0.1:1/stream/ws",
                                 [spot_market("BTC/USDT", "BTCUSDT")])  # fmt: skip
        client = exchange.client("ws://127.0.0.1:1/stream/ws/0")
        texts = [json.dumps({"e": "trade", **t}) for t in _trades(n)]
        wall, cpu = time.perf_counter(), time.process_time()
        for text in texts:
            client.handle_text_or_binary_message(text)
        out = (time.perf_counter() - wall, time.process_time() - cpu)
        assert len(exchange.trades["BTC/USDT"]) > 0
        await exchange.close()
        return out

    return asyncio.run(main())


def run_cryptofeed(n: int) -> tuple[float, float]:
    """Wall and CPU seconds for cryptofeed to parse `n` combined aggTrade messages into Trades."""
    import asyncio

    from cryptofeed.defines import TRADES
    from cryptofeed.exchanges import Binance
    from cryptofeed.symbols import Symbols

    Symbols.set(Binance.id, {"BTC-USDT": "BTCUSDT"}, {"instrument_type": {"BTC-USDT": "spot"}})
    seen = []

    async def on_trade(trade: object, receipt: float) -> None:
        seen.append(trade)

    async def main() -> tuple[float, float]:
        feed = Binance(symbols=["BTC-USDT"], channels=[TRADES], callbacks={TRADES: on_trade})
        texts = [
            json.dumps({"stream": "btcusdt@aggTrade",
                        "data": {"e": "aggTrade", **t, "a": t["t"], "f": t["t"], "l": t["t"]}})
            for t in _trades(n)
        ]  # fmt: skip
        wall, cpu = time.perf_counter(), time.process_time()
        for text in texts:
            await feed.message_handler(text, None, time.time())
        out = (time.perf_counter() - wall, time.process_time() - cpu)
        assert len(seen) == n
        return out

    return asyncio.run(main())


def main() -> None:
    """Alternate subprocess rounds of both libraries and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cryptofeed-python", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--one", choices=["ccxt", "cryptofeed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        runner = run_ccxt if args.one == "ccxt" else run_cryptofeed
        print(json.dumps(runner(args.messages)))
        return
    pythons = {"ccxt": sys.executable, "cryptofeed": args.cryptofeed_python}
    results: dict[str, list[tuple[float, float]]] = {"ccxt": [], "cryptofeed": []}
    for _ in range(args.rounds):
        for lib, python in pythons.items():
            cmd = [python, __file__, "--cryptofeed-python", args.cryptofeed_python,
                   "--messages", str(args.messages), "--one", lib]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
            results[lib].append((wall, cpu))
    for lib, rounds in results.items():
        rate = statistics.median(args.messages / w for w, _ in rounds)
        cpu_us = statistics.median(c / args.messages * 1e6 for _, c in rounds)
        print(f"{lib:<11} {rate:>10,.0f} messages/s  {cpu_us:6.1f} us CPU/message  "
              f"(median of {args.rounds} rounds of {args.messages:,})")  # fmt: skip


if __name__ == "__main__":
    main()
