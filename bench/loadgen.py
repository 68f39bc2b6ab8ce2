"""Open-loop tick generator: sends at scheduled times, never slowed by the system under test.

Each tick's `recv_ns` is its *intended* send time, so a sender that falls behind
shows up as latency (no coordinated omission). Several senders split one schedule:
sender k of m sends ticks i with i % m == k. With --trace-sample-rate, that fraction
of the ticks carries a `traceparent` header (a fresh random trace each), at most
--trace-max-per-second of them a second over all senders (the feed's `TraceBudget`,
spent on the schedule's clock), as the feed sends them.

Run: python -m bench.loadgen --bootstrap HOST:PORT --topic T --rate R --duration S --start-ns T0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import numpy as np
import orjson

from deploy.settings import load_settings
from stream.kafka.clients import make_producer, start_client
from tickserve.tracing import TRACEPARENT, TraceBudget

SIDES = ("sell", "buy")


def _traceparent(rng: np.random.Generator) -> bytes:
    """A W3C traceparent of a new sampled trace (random trace and span ids)."""
    trace_id, span_id = rng.bytes(16).hex(), rng.bytes(8).hex()
    return f"00-{trace_id}-{span_id}-01".encode()


async def send(args: argparse.Namespace) -> tuple[int, float]:
    """Send this sender's share of the schedule; return (sent, worst lag behind it in ms)."""
    n = int(args.rate * args.duration)
    mine = np.arange(args.sender, n, args.senders, dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    names = [f"SYN{i:03d}/USD" for i in range(args.symbols)]
    symbols = [name.encode() for name in names]
    sym_of = mine % args.symbols
    # one random walk per symbol, in schedule order
    steps = rng.normal(0.0, 2e-4, len(mine))
    base = 100.0 * np.exp(rng.normal(0, 0.5, args.symbols))
    # quoted as an exchange would: prices on a 0.01 tick, quantities in 1e-6 lots
    # (full-precision floats have 17 digits, which no venue sends)
    price = np.round(base[sym_of] * np.exp(np.cumsum(steps)), 2)
    qty = np.maximum(np.round(rng.exponential(1.0, len(mine)), 6), 1e-6)
    side = rng.random(len(mine)) < 0.5
    traced = rng.random(len(mine)) < args.trace_sample_rate
    due_ns = args.start_ns + (mine * 1_000_000_000) // int(args.rate)
    budget = TraceBudget(args.trace_max_per_second / args.senders)
    for i in np.flatnonzero(traced):
        traced[i] = budget.take(due_ns[i] / 1e9)

    security = load_settings().kafka_security  # TICKSERVE_KAFKA_*, as the worker reads them
    producer = make_producer(args.bootstrap, args.linger_ms, security)
    await start_client(producer, args.bootstrap, security)
    partitions = len(await producer.partitions_for(args.topic))
    worst_lag = 0.0
    pending = []
    builders: dict[int, Any] = {}
    opened: dict[int, int] = {}  # partition -> when its open batch got its first tick
    linger_ns = args.linger_ms * 1_000_000
    try:
        k = 0
        while k < len(mine):
            now = time.time_ns()
            if due_ns[k] > now:
                # wake at most once a millisecond (the event loop's timer resolution):
                # sleeping until each tick's own due time woke the sender per tick and
                # spent ~40 us of CPU per tick; a tick sent up to 1 ms after its due
                # time counts that delay as latency (recv_ns is the due time)
                await asyncio.sleep(min(max(due_ns[k] - now, 1_000_000), 2_000_000) / 1e9)
                continue
            worst_lag = max(worst_lag, (now - due_ns[k]) / 1e6)
            # everything due by now is appended to one record batch per partition, sent
            # closed once it is linger_ms old (producer.send per record cost ~20 us a
            # tick: the senders, not the system under test, then saturated this machine;
            # the linger keeps the broker's batches few, see BROKER.md)
            end = int(np.searchsorted(due_ns, now, side="right"))
            for j in range(k, end):
                s = int(sym_of[j])
                value = orjson.dumps(
                    {
                        "symbol": names[s],
                        "event_ns": int(due_ns[j]),
                        "price": float(price[j]),
                        "quantity": float(qty[j]),
                        "side": SIDES[int(side[j])],
                        "trade_id": str(int(mine[j])),
                        "recv_ns": int(due_ns[j]),
                    }
                )
                p = s % partitions  # a symbol's ticks share a partition, as keyed ones do
                builder = builders.get(p)
                if builder is None:
                    builder = builders[p] = producer.create_batch()
                    opened[p] = now
                headers = [(TRACEPARENT, _traceparent(rng))] if traced[j] else []
                if (
                    builder.append(timestamp=None, key=symbols[s], value=value, headers=headers)
                    is None
                ):
                    builder.close()
                    pending.append(await producer.send_batch(builder, args.topic, partition=p))
                    builder = builders[p] = producer.create_batch()
                    opened[p] = now
                    builder.append(timestamp=None, key=symbols[s], value=value, headers=headers)
            k = end
            last = k == len(mine)
            for p in [p for p, at in opened.items() if last or now - at >= linger_ns]:
                builder = builders.pop(p)
                del opened[p]
                builder.close()
                pending.append(await producer.send_batch(builder, args.topic, partition=p))
            if len(pending) > 2_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return len(mine), worst_lag


def main() -> None:
    """Entry point; prints `sent=N worst_lag_ms=X`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, required=True, help="ticks/s of the whole schedule")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--start-ns", type=int, required=True, help="schedule start (epoch ns)")
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--sender", type=int, default=0)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument(
        "--trace-sample-rate", type=float, default=0.0, help="fraction of ticks with a traceparent"
    )
    parser.add_argument(
        "--trace-max-per-second",
        type=float,
        default=0.0,
        help="at most this many traced ticks a second over all senders (0: no cap)",
    )
    args = parser.parse_args()
    args.seed += args.sender
    import uvloop

    sent, lag = uvloop.run(send(args))
    print(f"sent={sent} worst_lag_ms={lag:.1f}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
