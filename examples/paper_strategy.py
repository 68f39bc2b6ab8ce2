"""A paper strategy on tickserve's signals: hold each symbol in the direction of its last signal.

Reads the signals topic through `tickserve.client` and the ticks topic for prices;
marks each position to market at the price of the tick every signal answers, and
prints the PnL per symbol at the end.

Run against a running stack (`tickserve up`, `tickserve serve`, `tickserve feed`):
    python examples/paper_strategy.py --bootstrap 127.0.0.1:19092 --signals 5000
"""

from __future__ import annotations

import argparse
import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer

from stream.contracts.signal import Signal
from tickserve.client import SignalsConfig, signals


@dataclass
class Book:
    """Positions (+1 long, -1 short, 0 flat), entry prices and realized PnL per symbol."""

    position: dict[str, int] = field(default_factory=dict)
    entry: dict[str, float] = field(default_factory=dict)
    pnl: dict[str, float] = field(default_factory=dict)
    signals: int = 0

    def on_signal(self, signal: Signal, price: float) -> None:
        """Mark the symbol's position to `price`, then take the signal's direction."""
        symbol = signal.symbol
        held = self.position.get(symbol, 0)
        if held:
            self.pnl[symbol] = self.pnl.get(symbol, 0.0) + held * (price - self.entry[symbol])
        self.entry[symbol] = price
        self.position[symbol] = signal.direction if signal.score is not None else 0
        self.signals += 1


async def _prices(bootstrap: str, topic: str, into: dict[tuple[str, str], float]) -> None:
    """Every tick's price by (symbol, trade id), from the start of the ticks topic."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    try:
                        tick = orjson.loads(record.value)
                        into[(tick["symbol"], str(tick["trade_id"]))] = float(tick["price"])
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # the worker dead-letters these; a strategy just skips them
    finally:
        await consumer.stop()


async def paper_trade(config: SignalsConfig, ticks_topic: str, stop_after: int) -> Book:
    """Trade `stop_after` signals on paper; returns the book."""
    prices: dict[tuple[str, str], float] = {}
    reader = asyncio.create_task(_prices(config.bootstrap, ticks_topic, prices))
    book = Book()
    try:
        async with aclosing(signals(config)) as stream:
            async for signal in stream:
                key = (signal.symbol, signal.trade_id)
                while key not in prices:  # the tick is on its way: signals follow their ticks
                    await asyncio.sleep(0.01)
                book.on_signal(signal, prices[key])
                if book.signals >= stop_after:
                    break
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return book


def main() -> None:
    """Command line: trade N signals, print PnL per symbol."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--signals-topic", default="signals")
    parser.add_argument("--ticks-topic", default="ticks")
    parser.add_argument("--signals", type=int, default=1000, help="stop after this many")
    parser.add_argument("--from-start", action="store_true", help="read the topic from offset 0")
    args = parser.parse_args()
    config = SignalsConfig(
        args.bootstrap, topic=args.signals_topic, start="earliest" if args.from_start else "latest"
    )
    book = asyncio.run(paper_trade(config, args.ticks_topic, args.signals))
    for symbol in sorted(book.pnl):
        print(f"{symbol:>16}  pnl {book.pnl[symbol]:+.6f}  position {book.position[symbol]:+d}")
    print(f"{book.signals} signals, total pnl {sum(book.pnl.values()):+.6f}")


if __name__ == "__main__":
    main()
