"""`python -m bench`: the end-to-end benchmark against the broker floor, and report comparison.

Run from a source checkout (benchmarks are not installed with the package):
    python -m bench e2e [--rate 20000 --duration 20 --symbols 100 --partitions 4 --rounds 3]
    python -m bench e2e --floors aiokafka,confluent,echo   (the echo floors, in order)
    python -m bench e2e --tls   (every Kafka connection over TLS: the broker behind stunnel4)
    python -m bench e2e --trace-sample-rate 0.001   (tracing on, for CPU per tick)
    python -m bench compare A.json B.json
    python -m bench monitor [--ticks 400000 --batch 1000 --symbols 20]
    python -m bench hammer [--rate 2000 --duration 15 --rounds 2 --clients 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.settings import Settings, load_settings
from tickserve.errors import TickserveError
from tickserve.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m bench` (each command has --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="benchmarks: e2e against the broker floor, compare, monitor",
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    e2e = sub.add_parser("e2e", help="tick-to-signal latency vs an echo worker")
    e2e.add_argument("--rate", type=float, default=20_000, help="ticks/s offered")
    e2e.add_argument("--duration", type=float, default=20.0, help="seconds per system")
    e2e.add_argument("--symbols", type=int, default=100)
    e2e.add_argument("--partitions", type=int, default=4)
    e2e.add_argument(
        "--senders",
        type=int,
        default=0,
        help="load generator processes (0: one per 50,000 ticks/s)",
    )
    e2e.add_argument("--sweep", default="", help="comma-separated rates for a rate sweep")
    e2e.add_argument(
        "--against",
        choices=("tickserve", "echo"),
        default="tickserve",
        help="echo: measure the floor against itself (how far the ratios move by chance)",
    )
    e2e.add_argument(
        "--realtime-priority",
        type=int,
        default=0,
        help="SCHED_FIFO priority of the worker's and the echo floor's stream thread (0: none)",
    )
    e2e.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure floor and system this many times, alternating; figures pool the rounds",
    )
    e2e.add_argument(
        "--trace-sample-rate",
        type=float,
        default=0.0,
        help="tracing on: this fraction of ticks carries a traceparent and the worker exports "
        "spans to a local OTLP receiver (0: tracing off; the feed's default is 0.001)",
    )
    e2e.add_argument(
        "--trace-max-per-second",
        type=float,
        default=Settings.model_fields["trace_max_per_second"].default,
        help="with tracing on, at most this many traced ticks a second (the feed's default; "
        "0: no cap)",
    )
    e2e.add_argument(
        "--model-type",
        default="logistic",
        choices=("logistic", "hgb", "hgb-gemm", "mlp"),
        help="model trained and served (hgb-gemm and mlp run on a GPU)",
    )
    e2e.add_argument("--gpu", action="store_true", help="let the worker use a GPU if usable")
    e2e.add_argument(
        "--tls",
        action="store_true",
        help="every Kafka connection over TLS: each fresh broker behind stunnel4",
    )
    e2e.add_argument(
        "--exactly-once",
        action="store_true",
        help="the worker with TICKSERVE_EXACTLY_ONCE (latency read uncommitted)",
    )
    e2e.add_argument(
        "--floors",
        default="aiokafka,confluent,echo",
        help="echo floors, each round in this order: aiokafka (stock aiokafka), confluent "
        "(librdkafka), echo (tickserve's own data plane)",
    )
    e2e.add_argument("--out", default="bench/results", help="directory for JSON and PNG")
    mon = sub.add_parser("monitor", help="the rate tickserve monitor holds (summaries, ticks/s)")
    mon.add_argument("--ticks", type=int, default=400_000, help="synthetic ticks in the backlog")
    mon.add_argument("--batch", type=int, default=1000, help="ticks per summary (micro-batch)")
    mon.add_argument("--symbols", type=int, default=20)
    mon.add_argument("--out", default="bench/results", help="directory for the JSON")
    ham = sub.add_parser("hammer", help="tick-to-signal latency with /predict hammered, and not")
    ham.add_argument("--rate", type=float, default=2000, help="ticks/s offered")
    ham.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    ham.add_argument("--rounds", type=int, default=2, help="quiet and hammered runs, alternating")
    ham.add_argument("--clients", type=int, default=4, help="processes posting to /predict")
    ham.add_argument("--symbols", type=int, default=20)
    ham.add_argument("--out", default="bench/results", help="directory for the JSON")
    cmp_ = sub.add_parser("compare", help="print the differences between two reports")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark or the comparison `args` ask for."""
    from bench.e2e import E2EConfig, compare, run_e2e, summary

    if args.bench == "monitor":
        from bench.monitor import MonitorBenchConfig, run_monitor_bench
        from bench.monitor import summary as monitor_summary

        figures = run_monitor_bench(
            MonitorBenchConfig(args.ticks, args.batch, args.symbols, out_dir=Path(args.out))
        )
        print(monitor_summary(figures))
        return 0
    if args.bench == "hammer":
        from bench.predict_hammer import HammerConfig, run_hammer
        from bench.predict_hammer import summary as hammer_summary

        hammer = HammerConfig(
            args.rate, args.duration, args.rounds, args.clients, args.symbols,
            out_dir=Path(args.out),
        )  # fmt: skip
        report = run_hammer(hammer)
        print(hammer_summary(report))
        print(f"report: {report}")
        return 0
    if args.bench == "compare":
        print(compare(Path(args.a), Path(args.b)))
        return 0
    sweep = tuple(float(r) for r in args.sweep.split(",")) if args.sweep else ()
    config = E2EConfig(
        rate=args.rate,
        duration_s=args.duration,
        symbols=args.symbols,
        partitions=args.partitions,
        senders=args.senders,
        sweep=sweep,
        out_dir=Path(args.out),
        realtime_priority=args.realtime_priority,
        against=args.against,
        rounds=args.rounds,
        trace_sample_rate=args.trace_sample_rate,
        trace_max_per_second=args.trace_max_per_second,
        model_type=args.model_type,
        gpu=args.gpu,
        floors=tuple(name.strip() for name in args.floors.split(",") if name.strip()),
        tls=args.tls,
        exactly_once=args.exactly_once,
    )
    path = run_e2e(config)
    print(summary(path))
    print(f"report: {path} and {path.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors we expect become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        setup_logging(load_settings().log_level)
        return run(args)
    except TickserveError as exc:
        print(f"python -m bench {args.bench}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
