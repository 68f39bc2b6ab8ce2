"""The `tickserve` command line: one subcommand per process role."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from deploy.settings import Settings, load_settings
from tickserve.errors import ConfigError, TickserveError
from tickserve.logs import setup_logging

logger = logging.getLogger(__name__)


def _run(coro: object) -> object:
    """Run a coroutine on uvloop."""
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Start the local stack and print where each component is."""
    from deploy.stack import LocalStack

    for c in LocalStack(settings).up():
        print(f"{c.name:<11} {c.url}" + (f"  (log: {c.log_file})" if c.log_file else ""))
    return 0


def cmd_down(settings: Settings, args: argparse.Namespace) -> int:
    """Stop what `up` started."""
    from deploy.stack import LocalStack

    stopped = LocalStack(settings).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_feed(settings: Settings, args: argparse.Namespace) -> int:
    """Publish ticks from a file or the synthetic market."""
    from stream.feed import Pacing, SyntheticMarket, publish, read_trades
    from stream.kafka import ensure_topics

    if args.file:
        ticks = read_trades(Path(args.file), args.symbol)[args.skip :]
        if args.limit:
            ticks = ticks[: args.limit]
        source: object = ticks
    else:
        source = SyntheticMarket(symbols=args.symbols, seed=args.seed).ticks(args.count)

    async def main() -> int:
        await ensure_topics(settings.bootstrap, [settings.ticks_topic], settings.partitions)
        return await publish(
            source,  # type: ignore[arg-type]
            settings.bootstrap, settings.ticks_topic, Pacing(args.speed, args.rate),
            settings.linger_ms,
        )  # fmt: skip

    sent = _run(main())
    print(f"feed: published {sent} ticks to {settings.ticks_topic}")
    return 0


def cmd_archive(settings: Settings, args: argparse.Namespace) -> int:
    """Consume `ticks` into the ClickHouse archive."""
    from stream.archive import ArchiverConfig, ClickHouseArchive, run_archiver

    archive = ClickHouseArchive.open(settings.clickhouse)
    config = ArchiverConfig(
        settings.bootstrap, settings.ticks_topic, settings.archive_group_id,
        max_future_ns=settings.max_future_ms * 1_000_000,
    )  # fmt: skip

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        return await run_archiver(archive, config, stop, args.idle_exit)

    inserted = _run(main())
    print(f"archive: inserted {inserted} ticks, {archive.count_ticks()} in the archive")
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    """Train on the archive and register the model as the alias."""
    from stream.archive import ClickHouseArchive
    from training.dataset import build_dataset
    from training.train import train_and_register

    spec = settings.feature_spec
    ticks = ClickHouseArchive.open(settings.clickhouse).read_ticks(args.symbols or None)
    dataset = build_dataset(ticks, spec)
    result = train_and_register(
        dataset, spec, settings.mlflow_uri, settings.model_name, settings.model_alias
    )
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    print(f"train: {result.name} v{result.version} -> @{settings.model_alias}: {shown}")
    return 0


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the stream worker, the model watcher and the HTTP API until SIGTERM/SIGINT."""
    from deploy.stack import port_free
    from features.engine import FeatureEngine
    from features.online import OnlineWriter, open_store
    from inference.api import ApiContext, create_app, serve_http
    from inference.batcher import BatcherConfig, MicroBatcher
    from inference.validation import ValidationPolicy
    from inference.watcher import ModelWatcher, WatcherConfig
    from stream.kafka import ensure_topics
    from stream.worker import StreamWorker, WorkerConfig

    spec = settings.feature_spec
    if settings.metrics_port and not port_free(settings.metrics_port):
        raise ConfigError(f"metrics port {settings.metrics_port} is already in use")
    watcher = ModelWatcher(
        WatcherConfig(
            settings.mlflow_uri, settings.model_name, settings.model_alias,
            settings.challenger_alias, settings.model_poll_s, settings.prefer_gpu,
            ValidationPolicy(warmup_rows=settings.max_batch,
                             warmup_budget_s=settings.warmup_budget_ms / 1000),
            onnx_threads=settings.onnx_threads,
        ),
        spec,
    )  # fmt: skip
    model = watcher.load_initial()  # a champion that fails its checks never serves
    batcher = MicroBatcher(
        model, spec.n_features,
        BatcherConfig(settings.max_batch, settings.max_delay_us, settings.stale_ms * 1_000_000),
    )  # fmt: skip
    writer = OnlineWriter(open_store(settings.redis, settings.feast_registry), spec).start()
    config = WorkerConfig(
        bootstrap=settings.bootstrap, ticks_topic=settings.ticks_topic,
        signals_topic=settings.signals_topic, dlq_topic=settings.dlq_topic,
        group_id=settings.group_id, fetch_max_wait_ms=settings.fetch_max_wait_ms,
        linger_ms=settings.linger_ms, max_batch=settings.max_batch,
        max_future_ns=settings.max_future_ms * 1_000_000,
        shadow_topic=settings.shadow_topic if settings.challenger_alias else "",
    )  # fmt: skip
    engine = FeatureEngine(spec, settings.max_symbols)
    worker = StreamWorker(config, engine, model, writer, batcher)

    async def main() -> None:
        topics = [settings.ticks_topic, settings.signals_topic, settings.dlq_topic]
        if config.shadow_topic:
            topics.append(config.shadow_topic)
        await ensure_topics(settings.bootstrap, topics, settings.partitions)
        stop = asyncio.Event()
        _stop_on_signals(stop)
        others = [asyncio.create_task(watcher.run(batcher, stop))]
        if settings.metrics_port:
            api = create_app(ApiContext(batcher, spec.names, worker.last_rows.get,
                                        worker.assigned.is_set, config.threshold))  # fmt: skip
            others.append(
                asyncio.create_task(
                    serve_http(api, settings.http_host, settings.metrics_port, stop)
                )
            )
        try:
            await worker.run(stop)
        finally:
            stop.set()
            await asyncio.gather(*others, return_exceptions=True)

    _run(main())
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """The whole loop on the local stack, with a closing summary line."""
    from deploy.demo import run_demo

    return run_demo(settings, Path(args.data), args.live_rate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every subcommand has --help)."""
    parser = argparse.ArgumentParser(
        prog="tickserve",
        description="Low-latency streaming inference for trading models. "
        "Configuration comes from TICKSERVE_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("up", help="start the local stack (broker, Redis, MLflow store, ClickHouse)")
    sub.add_parser("down", help="stop the local stack")

    feed = sub.add_parser("feed", help="publish ticks from a trade file or a synthetic market")
    feed.add_argument("--file", help="trade file: ccxt Parquet/CSV/JSON, freqtrade JSON, aggTrade")
    feed.add_argument("--symbol", help="symbol for files whose rows carry none")
    feed.add_argument("--skip", type=int, default=0, help="skip the first N rows of the file")
    feed.add_argument("--limit", type=int, default=0, help="send at most N rows (0: all)")
    feed.add_argument("--speed", type=float, default=0.0, help="x original time (0: max speed)")
    feed.add_argument("--rate", type=float, default=0.0, help="fixed ticks/s (overrides --speed)")
    feed.add_argument("--symbols", type=int, default=10, help="synthetic: number of symbols")
    feed.add_argument("--count", type=int, default=10_000, help="synthetic: ticks to send")
    feed.add_argument("--seed", type=int, default=7, help="synthetic: random seed")

    archive = sub.add_parser("archive", help="consume ticks into the ClickHouse archive")
    archive.add_argument(
        "--idle-exit", type=float, default=None, help="exit after S seconds without records"
    )

    train = sub.add_parser("train", help="train on the archive, register in MLflow, set alias")
    train.add_argument("--symbols", nargs="*", help="restrict to these symbols")

    sub.add_parser("serve", help="run the stream worker (ticks -> signals)")

    demo = sub.add_parser("demo", help="feed, archive, train, serve and measure, end to end")
    demo.add_argument(
        "--data", default="../shared/data/freqtrade/XRP_ETH-trades.parquet", help="trade file"
    )
    demo.add_argument("--live-rate", type=float, default=500.0, help="ticks/s of the live phase")
    return parser


COMMANDS = {
    "up": cmd_up, "down": cmd_down, "feed": cmd_feed, "archive": cmd_archive,
    "train": cmd_train, "serve": cmd_serve, "demo": cmd_demo,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors we expect become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        return COMMANDS[args.command](settings, args)
    except TickserveError as exc:
        print(f"tickserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
