"""An OTLP/HTTP receiver for the benchmark: takes the worker's spans and counts them.

`python -m bench e2e --trace-sample-rate R` points the worker's exporter here, so that
tracing costs the worker what it would cost against a real collector.

Run: python -m bench.otlp_sink --port PORT   (prints "ready", then "spans=N" on SIGTERM)
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings


async def receive(port: int) -> int:
    """Count spans until SIGTERM or SIGINT; return the count."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    count = 0
    async with OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(port)) as tap:

        async def keep() -> None:
            nonlocal count
            async for _ in tap.stream_traces():
                count += 1

        task = asyncio.create_task(keep())
        await asyncio.sleep(0)
        print("ready", flush=True)
        await stop.wait()
        await asyncio.sleep(0.5)  # what is in flight still lands
        task.cancel()
    return count


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    count = asyncio.run(receive(parser.parse_args().port))
    print(f"spans={count}", flush=True)


if __name__ == "__main__":
    main()
