"""Can /predict hurt the stream? Tick-to-signal latency with and without clients hammering it.

The worker (`tickserve serve`, its HTTP API on) takes ticks at a fixed rate, as in
`bench.e2e`; in alternate runs, `--clients` processes post to `/predict` as fast as
they get answers: a valid row, then the largest body the API accepts to read (just
under `max_body_bytes`, a features array the API parses and refuses with 422), again
and again. The report gives tick-to-signal percentiles pooled over the rounds of each
kind and the p99 ratio hammered / quiet (issue 22 asks for <= 1.10).

Run: python -m bench hammer [--rate 2000 --duration 15 --rounds 2 --clients 4]
A client alone: python -m bench.predict_hammer --url URL --start-ns NS --duration S
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.e2e import ROOT, Bench, E2EConfig, _machine, _public, pool
from deploy.settings import Settings
from deploy.stack import free_port
from inference.api import MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class HammerConfig:
    """One hammer benchmark's knobs."""

    rate: float = 2000.0
    duration_s: float = 15.0
    rounds: int = 2
    clients: int = 4
    symbols: int = 20
    partitions: int = 4
    out_dir: Path = Path("bench/results")


def bodies(n_features: int, max_bytes: int = MAX_BODY_BYTES) -> tuple[bytes, bytes]:
    """A valid one-row body, and the largest features body under `max_bytes`.

    >>> row, big = bodies(3, 100)
    >>> row, len(big) < 100, big.startswith(b'{"features":[0.5,')
    (b'{"features":[0.5,0.5,0.5]}', True, True)
    """
    row = b'{"features":[' + b",".join([b"0.5"] * n_features) + b"]}"
    count = (max_bytes - len(b'{"features":[]}') - 1) // 4
    big = b'{"features":[' + b",".join([b"0.5"] * count) + b"]}"
    return row, big


def client(url: str, start_ns: int, duration_s: float, n_features: int) -> Counter[str]:
    """Post row and maximal bodies to `url` from `start_ns` for `duration_s`; count answers."""
    row, big = bodies(n_features)
    counts: Counter[str] = Counter()
    time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
    end = time.monotonic() + duration_s
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=10.0) as http:
        while time.monotonic() < end:
            for body in (row, big):
                try:
                    counts[str(http.post(url, content=body, headers=headers).status_code)] += 1
                except httpx.HTTPError:
                    counts["error"] += 1
                    time.sleep(0.05)  # the API may not listen yet
    return counts


@contextlib.contextmanager
def hammering(
    port: int,
    clients: int,
    start_ns: int,
    duration_s: float,
    n_features: int,
    into: list[dict[str, int]],
) -> Iterator[None]:
    """`clients` processes posting to /predict of `port` from `start_ns` on, as the senders."""
    argv = [sys.executable, "-m", "bench.predict_hammer", "--url",
            f"http://127.0.0.1:{port}/predict", "--start-ns", str(start_ns), "--duration",
            str(duration_s), "--features", str(n_features)]  # fmt: skip
    procs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(clients)
    ]
    try:
        yield
    finally:
        total: Counter[str] = Counter()
        for proc in procs:
            out = proc.communicate(timeout=duration_s + 60)[0]
            total.update(json.loads(out.strip().splitlines()[-1]))
        into.append(dict(total))


def run_hammer(config: HammerConfig) -> Path:
    """Alternate quiet and hammered runs of the worker; write the JSON report, return its path."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    n_features = Settings().feature_spec.n_features
    e2e = E2EConfig(
        rate=config.rate, duration_s=config.duration_s, symbols=config.symbols,
        partitions=config.partitions, out_dir=config.out_dir,
        warmup_s=min(7.0, config.duration_s / 2), start_timeout_s=300.0,
    )  # fmt: skip
    quiet: list[dict[str, Any]] = []
    hammered: list[dict[str, Any]] = []
    answers: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="tickserve-hammer-") as tmp:
        bench = Bench(e2e, Path(tmp))
        try:
            for k in range(max(config.rounds, 1)):
                # alternate which kind goes first, so neither always meets a warmer machine
                for kind in ("quiet", "hammered") if k % 2 == 0 else ("hammered", "quiet"):
                    port = free_port()
                    env = {"TICKSERVE_HTTP_PORT": str(port)}
                    if kind == "quiet":
                        quiet.append(bench.measure("tickserve", config.rate, config.duration_s,
                                                   env))  # fmt: skip
                        continue

                    def alongside(start_ns: int, port: int = port) -> Any:
                        return hammering(port, config.clients, start_ns, config.duration_s,
                                         n_features, answers)  # fmt: skip

                    hammered.append(
                        bench.measure(
                            "tickserve", config.rate, config.duration_s, env, alongside=alongside
                        )  # fmt: skip
                    )
        finally:
            bench.close()
    calm, busy = pool(quiet), pool(hammered)
    ratio = {q: busy["latency_ms"][q] / calm["latency_ms"][q] for q in ("p50", "p99")}
    requests: Counter[str] = Counter()
    for one in answers:
        requests.update(one)
    report = {
        "machine": _machine(), "config": {k: str(v) for k, v in asdict(config).items()},
        "quiet": _public(calm), "hammered": _public(busy), "p_ratio_hammered_over_quiet": ratio,
        "predict_answers": dict(requests),
        "predict_per_s": sum(requests.values()) / (config.duration_s * len(answers)),
    }  # fmt: skip
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = config.out_dir / f"hammer-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def summary(path: Path) -> str:
    """Human-readable lines of one report."""
    rep = json.loads(path.read_text())
    lines = []
    for kind in ("quiet", "hammered"):
        lat = rep[kind]["latency_ms"]
        lines.append(
            f"{kind:>9}: tick-to-signal p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
            f"lost {rep[kind]['lost']}, rounds {rep[kind].get('rounds', 1)}"
        )
    ratio = rep["p_ratio_hammered_over_quiet"]
    lines.append(f"ratio hammered/quiet: p50 {ratio['p50']:.2f}, p99 {ratio['p99']:.2f} "
                 f"(target p99 <= 1.10)")  # fmt: skip
    lines.append(
        f"/predict answers {rep['predict_answers']} ({rep['predict_per_s']:.0f} requests/s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One hammering client: prints its answer counts as JSON on the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.predict_hammer")
    parser.add_argument("--url", required=True)
    parser.add_argument("--start-ns", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--features", type=int, required=True)
    args = parser.parse_args(argv)
    counts = client(args.url, args.start_ns, args.duration, args.features)
    print(json.dumps(dict(counts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
