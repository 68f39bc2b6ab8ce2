"""The `tickserve` command line: one subcommand per process role."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from deploy.settings import Settings, load_settings
from tickserve.errors import ConfigError, TickserveError
from tickserve.logs import setup_logging
from tickserve.sched import realtime_priority

logger = logging.getLogger(__name__)


def route_library_logs() -> None:
    """Keep mlflow from writing to stderr past the JSON log (set before it is imported).

    Its records then reach the root logger's JSON handler (`tickserve.logs`), and
    artifact downloads draw no progress bar.
    """
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
    """Publish ticks from a file (read chunk by chunk) or the synthetic market."""
    from itertools import chain, islice

    from deploy.tracing import start_tracing
    from stream.ingest.feed import Pacing, SyntheticMarket, publish, trade_chunks
    from stream.kafka.clients import ensure_topics

    if args.file:
        chunks = trade_chunks(Path(args.file), args.symbol)
        first = next(chunks, [])  # a missing or unreadable file fails here, before connecting
        rows = chain(first, chain.from_iterable(chunks))
        source: object = islice(rows, args.skip, args.skip + args.limit if args.limit else None)
    else:
        source = SyntheticMarket(symbols=args.symbols, seed=args.seed).ticks(args.count)

    async def main() -> int:
        security = settings.kafka_security
        await ensure_topics(
            settings.bootstrap, [settings.ticks_topic], settings.partitions, security
        )
        return await publish(
            source,  # type: ignore[arg-type]
            settings.bootstrap,
            settings.ticks_topic,
            Pacing(args.speed, args.rate),
            settings.linger_ms,
            security=security,
            tracing=start_tracing("tickserve-feed", settings),
        )

    sent = _run(main())
    print(f"feed: published {sent} ticks to {settings.ticks_topic}")
    return 0


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    """Publish one exchange's live trades to the ticks topic until SIGTERM/SIGINT."""
    from prometheus_client import start_http_server

    from stream.ingest.live import IngestConfig, LiveIngest, parse_symbols
    from stream.kafka.clients import ensure_topics

    config = IngestConfig(
        args.exchange,
        parse_symbols(args.symbols),
        settings.bootstrap,
        settings.ticks_topic,
        settings.kafka_security,
        linger_ms=settings.linger_ms,
        max_future_ns=settings.max_future_ms * 1_000_000,
    )

    async def main() -> object:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        ingest = LiveIngest(config, stop)
        await ensure_topics(
            settings.bootstrap, [settings.ticks_topic], settings.partitions, config.security
        )
        if args.metrics_port:
            start_http_server(args.metrics_port, addr=args.metrics_host)
        return await ingest.run()

    counts = _run(main())
    print(f"ingest: {counts}")
    return 0


def cmd_archive(settings: Settings, args: argparse.Namespace) -> int:
    """Consume `ticks` and `signals` into the ClickHouse archive."""
    from deploy.tracing import start_tracing
    from stream.ingest.archive import ArchiveCounts, ArchiverConfig, ClickHouseArchive, run_archiver

    archive = ClickHouseArchive.open(settings.clickhouse)
    config = ArchiverConfig(
        settings.bootstrap,
        settings.ticks_topic,
        settings.archive_group_id,
        max_future_ns=settings.max_future_ms * 1_000_000,
        signals_topic=settings.signals_topic,
        security=settings.kafka_security,
    )
    counts = ArchiveCounts()

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        tracing = start_tracing("tickserve-archive", settings)
        return await run_archiver(archive, config, stop, args.idle_exit, counts, tracing)

    _run(main())
    print(
        f"archive: inserted {counts.ticks} ticks and {counts.signals} signals "
        f"(skipped {counts.skipped} invalid); {archive.count_ticks()} ticks and "
        f"{archive.count_signals()} signals in the archive"
    )
    return 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on stderr: only on a terminal, and not with --no-progress."""
    return sys.stderr.isatty() and not args.no_progress


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Load a historical trade file straight into the archive."""
    from stream.ingest.archive import ClickHouseArchive
    from stream.ingest.backfill import import_file

    archive = ClickHouseArchive.open(settings.clickhouse)
    report = import_file(
        archive,
        Path(args.input),
        args.symbol,
        settings.max_future_ms * 1_000_000,
        progress=_progress(args),
    )
    print(f"import: {report.summary()}; {archive.count_ticks()} ticks in the archive")
    return 0


def _train_params(args: argparse.Namespace) -> object:
    """params.yaml (--params, else ./params.yaml if present, else built-in defaults)."""
    from training.params import TrainParams, load_params

    if args.params:
        return load_params(Path(args.params))
    default = Path("params.yaml")
    return load_params(default) if default.exists() else TrainParams()


def git_commit() -> str:
    """`git rev-parse HEAD` of the working directory, or "unknown"."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _provenance() -> dict[str, str]:
    """Git commit of the working tree and the DVC hash of the imported data, if known."""
    commit = git_commit()
    data_hash = "none"
    lock = Path("dvc.lock")
    if lock.exists():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        deps = stages.get("import", {}).get("deps", [])
        data_hash = ",".join(str(d.get("md5")) for d in deps if "md5" in d) or "none"
    return {"git_commit": commit, "dvc_data_hash": data_hash}


def _write_json(path: str | None, doc: dict[str, object]) -> None:
    if path:
        import json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    """Train on the archive and register a new version (the gate decides about the alias)."""
    from dataclasses import replace

    from stream.ingest.archive import ClickHouseArchive
    from training.cost import CostMeter, check_budget
    from training.dataset import build_dataset
    from training.params import TrainParams
    from training.train import train_and_register

    params: TrainParams = _train_params(args)  # type: ignore[assignment]
    if args.model:
        params = replace(params, model_type=args.model)
    meter = CostMeter(params.cost)
    spent = check_budget(settings.mlflow_uri, params.cost)
    spec = settings.feature_spec
    ticks = ClickHouseArchive.open(settings.clickhouse).read_ticks(args.symbols or None)
    dataset = build_dataset(
        ticks, spec, horizon_bars=params.splits.horizon_bars, progress=_progress(args)
    )
    result = train_and_register(
        dataset,
        spec,
        settings.mlflow_uri,
        settings.model_name,
        alias=None,
        params=params,
        provenance=_provenance(),
        meter=meter,
        figures_dir=Path(args.figures) if args.figures else None,
        progress=_progress(args),
    )
    print(
        f"train: {result.name} v{result.version} ({result.model_type}, run "
        f"{result.model_type}_{result.version} in {result.experiment}); "
        f"month's cost before it ${spent:.4f}"
    )
    for key in sorted(result.metrics):
        print(f"  {key:<24} {result.metrics[key]:>12.4f}")
    print("next: tickserve validate (promotes to @champion only if it passes)")
    _write_json(args.metrics_out, {"version": result.version, **result.metrics})
    return 0


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    """Run the validation gate on a registered version (default: the latest)."""
    from dataclasses import replace

    from training.gate import validate_version
    from training.params import TrainParams

    params: TrainParams = _train_params(args)  # type: ignore[assignment]
    overrides = {
        k: v
        for k, v in {
            "min_accuracy": args.min_accuracy,
            "min_sharpe": args.min_sharpe,
            "accuracy_margin": args.accuracy_margin,
            "sharpe_margin": args.sharpe_margin,
        }.items()
        if v is not None
    }
    gate = replace(params.gate, **overrides)
    decision = validate_version(
        settings.mlflow_uri, settings.model_name, gate, args.version, settings.model_alias
    )
    print(f"validate: {decision.summary()}")
    candidate = {f"test_{k}": v for k, v in decision.candidate.items()}
    _write_json(
        args.metrics_out,
        {
            "version": decision.version,
            "passed": decision.passed,
            "reasons": list(decision.reasons),
            **candidate,
        },
    )
    return 0 if decision.passed or args.exit_zero else 1


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Run the stream worker, the model watcher and the HTTP API until SIGTERM/SIGINT."""
    from deploy.compose import build_service
    from deploy.stack import port_free
    from deploy.tracing import start_tracing
    from stream.kafka.transport import diagnose

    if settings.kafka_security.protocol != "PLAINTEXT":  # a refused login, before models load
        _run(diagnose(settings.bootstrap, settings.kafka_security))
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    realtime_priority(settings.realtime_priority)
    if settings.http_port and not port_free(settings.http_port):
        raise ConfigError(f"HTTP port {settings.http_port} is already in use")
    service = build_service(settings, tracing=start_tracing("tickserve-worker", settings))
    # Everything imported and built so far (mlflow, feast, onnxruntime: ~200k objects)
    # lives as long as the process; frozen, the cyclic GC stops re-scanning it, and its
    # full collections stop showing up as latency spikes on the stream.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await service.run(stop)

    _run(main())
    return 0


def cmd_monitor(settings: Settings, args: argparse.Namespace) -> int:
    """Run the live quality monitor (faust) until SIGTERM/SIGINT."""
    from deploy.stack import port_free
    from stream.kafka.clients import ensure_topics
    from stream.monitor.app import MonitorConfig, QualityMonitor, run_monitor

    if not settings.summary_topic:
        raise ConfigError("TICKSERVE_SUMMARY_TOPIC is empty: the workers publish nothing to judge")
    port = settings.monitor_http_port
    if port and not port_free(port):
        raise ConfigError(f"monitor HTTP port {port} is already in use")
    asyncio.run(ensure_topics(settings.bootstrap, [settings.summary_topic], settings.partitions))
    config = MonitorConfig(
        app_id=settings.monitor_app_id,
        bootstrap=settings.bootstrap,
        summary_topic=settings.summary_topic,
        partitions=settings.partitions,
        bar_ns=settings.feature_spec.bar_ns,
        tracking_uri=settings.mlflow_uri,
        model_name=settings.model_name,
        model_alias=settings.model_alias,
        reference_poll_s=settings.model_poll_s,
        rollup_interval_s=settings.monitor_rollup_s,
        clickhouse_dsn=settings.monitor_clickhouse,
    )
    return run_monitor(QualityMonitor(config), port, settings.log_level)


def cmd_features(settings: Settings, args: argparse.Namespace) -> int:
    """Compute the stream's features offline for a trade file, one row per tick, chunk by chunk."""
    from collections.abc import Iterator

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.offline import feature_chunks, features_frame
    from stream.ingest.backfill import tick_tables
    from tickserve.progress import progress_bar

    skipped, rows, ready = Counter[str](), 0, 0
    far_future = 2**62  # a file is history: no clock-skew check
    columns = ["symbol", "event_ns", "trade_id", "price", "quantity", "is_buy"]

    def ticks() -> Iterator[pd.DataFrame]:
        for _, table, bad in tick_tables(Path(args.input), args.symbol, far_future, 0):
            skipped.update(bad)
            frame = table.select(columns).to_pandas()
            yield frame.assign(is_buy=frame["is_buy"].astype(bool))

    writer: pq.ParquetWriter | None = None
    with progress_bar("features", unit=" ticks", enabled=_progress(args)) as bar:
        for chunk in feature_chunks(ticks(), settings.feature_spec):
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(args.output, table.schema)
            writer.write_table(table)
            rows += len(chunk)
            ready += int(chunk["ready"].sum())
            bar.update(len(chunk))
    if writer is not None:
        writer.close()
    else:  # nothing valid: an empty table with the columns
        empty = pd.DataFrame(
            {c: pd.Series(dtype=t) for c, t in zip(columns, TICK_DTYPES, strict=True)}
        )
        features_frame(empty, settings.feature_spec).to_parquet(args.output, index=False)
    print(
        f"features: {rows} rows ({ready} ready) -> {args.output}; "
        f"skipped {sum(skipped.values())} invalid {dict(skipped)}; "
        f"spec {settings.feature_spec.hash}"
    )
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """The whole loop on the local stack, with a closing summary line."""
    from deploy.demo import run_demo

    return run_demo(settings, Path(args.data), args.live_rate)


TICK_DTYPES = ("object", "int64", "object", "float64", "float64", "bool")
NO_PROGRESS = "no progress bars (default: shown when stderr is a terminal)"


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
    feed.add_argument(
        "--file", help="trade file: ccxt/Kraken/tardis CSV, Parquet, JSON, freqtrade, aggTrade"
    )
    feed.add_argument("--symbol", help="symbol for files whose rows carry none")
    feed.add_argument("--skip", type=int, default=0, help="skip the first N rows of the file")
    feed.add_argument("--limit", type=int, default=0, help="send at most N rows (0: all)")
    feed.add_argument("--speed", type=float, default=0.0, help="x original time (0: max speed)")
    feed.add_argument("--rate", type=float, default=0.0, help="fixed ticks/s (overrides --speed)")
    feed.add_argument("--symbols", type=int, default=10, help="synthetic: number of symbols")
    feed.add_argument("--count", type=int, default=10_000, help="synthetic: ticks to send")
    feed.add_argument("--seed", type=int, default=7, help="synthetic: random seed")

    ingest = sub.add_parser("ingest", help="publish an exchange's live trades (websockets)")
    ingest.add_argument("--exchange", required=True, help="binance, coinbase or kraken")
    ingest.add_argument("--symbols", required=True, help="e.g. BTC/USDT,ETH/USDT")
    ingest.add_argument(
        "--metrics-port", type=int, default=9108, help="Prometheus /metrics port (0: none)"
    )
    ingest.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics binds")

    archive = sub.add_parser("archive", help="consume ticks into the ClickHouse archive")
    archive.add_argument(
        "--idle-exit", type=float, default=None, help="exit after S seconds without records"
    )

    imp = sub.add_parser("import", help="load a historical trade file into the archive")
    imp.add_argument("--input", required=True, help="trade file (same formats as feed --file)")
    imp.add_argument("--symbol", help="symbol for files whose rows carry none")
    imp.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    train = sub.add_parser("train", help="train on the archive, register a new version in MLflow")
    train.add_argument("--symbols", nargs="*", help="restrict to these symbols")
    train.add_argument("--params", help="params file (default: ./params.yaml if present)")
    train.add_argument(
        "--model",
        choices=["logistic", "hgb", "hgb-gemm", "mlp"],  # training.params.MODEL_TYPES
        help="override train.model.type",
    )
    train.add_argument("--figures", help="also save the figures as PNG in this folder")
    train.add_argument("--metrics-out", help="write the metrics as JSON here")
    train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    validate = sub.add_parser(
        "validate", help="validation gate: promote a version to the alias only if it passes"
    )
    validate.add_argument("--version", help="model version (default: the latest)")
    validate.add_argument("--params", help="params file (default: ./params.yaml if present)")
    validate.add_argument("--min-accuracy", type=float, help="default: train.gate in params")
    validate.add_argument("--min-sharpe", type=float, help="default: train.gate in params")
    validate.add_argument("--accuracy-margin", type=float, help="may trail the champion by")
    validate.add_argument("--sharpe-margin", type=float, help="may trail the champion by")
    validate.add_argument("--metrics-out", help="write the decision as JSON here")
    validate.add_argument(
        "--exit-zero", action="store_true", help="exit 0 on refusal too (tags still record it)"
    )

    sub.add_parser("serve", help="run the stream worker (ticks -> signals)")
    sub.add_parser("monitor", help="live model quality: accuracy and feature drift (faust)")

    features = sub.add_parser("features", help="offline features for a trade file -> Parquet")
    features.add_argument("--input", required=True, help="trade file (formats as for feed)")
    features.add_argument("--output", required=True, help="Parquet file to write")
    features.add_argument("--symbol", help="symbol for files whose rows carry none")
    features.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    demo = sub.add_parser("demo", help="feed, archive, train, serve and measure, end to end")
    demo.add_argument(
        "--data", default="../shared/data/freqtrade/XRP_ETH-trades.parquet", help="trade file"
    )
    demo.add_argument("--live-rate", type=float, default=500.0, help="ticks/s of the live phase")
    return parser


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "feed": cmd_feed,
    "ingest": cmd_ingest,
    "archive": cmd_archive,
    "import": cmd_import,
    "train": cmd_train,
    "validate": cmd_validate,
    "serve": cmd_serve,
    "monitor": cmd_monitor,
    "demo": cmd_demo,
    "features": cmd_features,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors we expect become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        route_library_logs()
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
