"""Tracing's CPU cost per tick, paired: two workers on the same ticks at the same time.

On a 2-core machine the worker's CPU per tick moves by more from one run to the next
(about +-9%) than the 3% that issue 19 allows tracing, so runs with tracing on and
off, taken one after the other, cannot show it either way. Here both workers read
the same ticks topic in consumer groups of their own, at the same time, on the same
broker, so whatever the machine does it does to both: `bench e2e`'s worker (its
sink measures latency and accounting) and a twin started beside it. In each round one
of them traces (the feed's default sampling: `--trace-sample-rate`, at most
`--trace-max-per-second`, spans exported to a local OTLP receiver) and the other does
not (OTEL_SDK_DISABLED); the roles swap every round, so neither the order of start
nor the sink's reads favour one side. Both CPUs are read from /proc over the same
window.

Run: python -m bench.trace_overhead [--rate 20000 --duration 40 --rounds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.e2e import WORKER_READY, Bench, E2EConfig, _cpu_seconds, _wait_for, stop_process
from deploy.settings import Settings

OFF = {"OTEL_SDK_DISABLED": "true"}  # tracing_requested() says no, whatever else is set


class PairedBench(Bench):
    """`Bench` whose measured worker has a twin on the same ticks, CPU read alike."""

    def __init__(self, config: E2EConfig, workdir: Path):
        """The stack as `Bench` starts it; the twin's variables are set per round."""
        super().__init__(config, workdir)
        self.twin_env: dict[str, str] = {}
        self.twin_cpu: dict[str, float] = {}
        self.twin_topic = ""
        self._twin: subprocess.Popen[bytes] | None = None

    @contextlib.contextmanager
    def system(
        self, kind: str, rate: float, worker_env: dict[str, str] | None = None
    ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
        """`Bench.system`'s worker, then its twin on the same ticks, both ready."""
        with super().system(kind, rate, worker_env) as (sink, proc):
            tag = f"twin-{time.time_ns()}"
            state = self.workdir / tag
            state.mkdir()
            # its own state directory (snapshots, logs), the same model registry
            env = {"TICKSERVE_MLFLOW_TRACKING_URI": self.settings.mlflow_uri, **self.twin_env}
            twin, log = self.start_worker(tag, self.source, state, env)
            try:
                try:
                    _wait_for(log, WORKER_READY, twin, self.config.start_timeout_s)
                except RuntimeError as exc:  # the work dir goes with the run: show why
                    raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from exc
                self.twin_topic = f"out-{tag}"
                self._twin = twin
                yield sink, proc
                if twin.poll() is not None:
                    raise RuntimeError(f"the twin exited early with {twin.returncode}; see {log}")
            finally:
                stop_process(twin)

    @contextlib.contextmanager
    def sample_twin(self, start_ns: int) -> Iterator[None]:
        """The twin's CPU over the window `measure` reads its worker's in."""
        assert self._twin is not None, "measure enters this inside system()"
        cfg, pid = self.config, self._twin.pid

        def sample() -> None:  # as `measure` samples its worker
            time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9 + cfg.warmup_s))
            self.twin_cpu["start"] = _cpu_seconds(pid)
            time.sleep(max(0.0, cfg.duration_s - cfg.warmup_s))
            self.twin_cpu["end"] = _cpu_seconds(pid)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            yield
        finally:
            sampler.join()


def main() -> None:
    """Print each round's CPU per tick, tracing on and off, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--trace-sample-rate", type=float, default=0.001)
    parser.add_argument(
        "--trace-max-per-second",
        type=float,
        default=Settings.model_fields["trace_max_per_second"].default,
    )
    args = parser.parse_args()
    config = E2EConfig(
        rate=args.rate, duration_s=args.duration, symbols=args.symbols,
        partitions=args.partitions, trace_sample_rate=args.trace_sample_rate,
        trace_max_per_second=args.trace_max_per_second,
    )  # fmt: skip
    window = config.duration_s - config.warmup_s
    ratios: list[float] = []
    print(f"{config.rate:,.0f} ticks/s, {config.duration_s:g} s ({window:g} s measured), "
          f"sampling {config.trace_sample_rate:g}, "
          f"at most {config.trace_max_per_second:g}/s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tickserve-trace-") as tmp:
        bench = PairedBench(config, Path(tmp))
        bench.twin_cpu = {}
        try:
            for k in range(args.rounds):
                traced_is_main = k % 2 == 0
                bench.twin_env = OFF if traced_is_main else {}
                res: dict[str, Any] = bench.measure(
                    "tickserve", config.rate, config.duration_s,
                    worker_env=None if traced_is_main else OFF, alongside=bench.sample_twin,
                )  # fmt: skip
                expected = int(config.rate * config.duration_s)
                twin_lost = bench._lost_on_reread(bench.twin_topic, np.empty(0, np.int64), expected)
                ticks = config.rate * window
                main_us = res["cpu_percent"] / 100 * window / ticks * 1e6
                twin_us = (bench.twin_cpu["end"] - bench.twin_cpu["start"]) / ticks * 1e6
                on, off = (main_us, twin_us) if traced_is_main else (twin_us, main_us)
                ratios.append(on / off)
                print(f"round {k + 1}: traced={'main' if traced_is_main else 'twin'} "
                      f"on {on:.2f} us/tick, off {off:.2f} us/tick, on/off {on / off:.3f}; "
                      f"lost main={res['lost']} twin={twin_lost}, main dup={res['duplicates']} "
                      f"p99={res['latency_ms']['p99']:.1f} ms", flush=True)  # fmt: skip
        finally:
            bench.close()
    # a cost that comes with a role (main or twin) multiplies one role's ratios and
    # divides the other's: the geometric mean of the two roles' means cancels it
    if len(ratios) < 2:
        print(f"on/off: traced main {ratios[0]:.3f} (one round: no role swapped)")
        return
    by_main, by_twin = statistics.fmean(ratios[0::2]), statistics.fmean(ratios[1::2])
    print(f"on/off: traced main {by_main:.3f}, traced twin {by_twin:.3f}, both roles "
          f"{math.sqrt(by_main * by_twin):.3f}; range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{bench.otlp_spans} spans exported")  # fmt: skip


if __name__ == "__main__":
    main()
