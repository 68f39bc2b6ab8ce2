"""Rounds of the e2e benchmark pooled into one measurement, and their report lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.e2e import STAGE_COLUMNS, _pct, _public, _ratios, fastest_independent, pool, summary


def _result(system: str, seed: int, ticks: int, cpu_s: float) -> dict:
    rng = np.random.default_rng(seed)
    latency = rng.lognormal(3.4, 0.5, ticks)
    stages = rng.lognormal(-1.0, 0.4, (ticks, len(STAGE_COLUMNS)))
    service = stages[:, 1:5].sum(axis=1)
    return {
        "system": system, "rate": 1000.0, "duration_s": 10.0, "expected": ticks,
        "received": ticks + 1, "lost": seed % 2, "duplicates": 1, "sender_worst_lag_ms": seed,
        "lag_growth": 1.0 + seed / 10, "cpu_percent": 10.0 + seed, "rss_mb": 100.0 + seed,
        "_cpu_s": cpu_s, "_measured": ticks, "_latency": latency, "dead_letters": {"late": 1},
        "_stages": stages, "_service": service, "_batches": ticks // 10,
        "micro_batches_per_s": 10.0 + seed, "latency_ms": _pct(latency),
        "cpu_us_per_tick": cpu_s / ticks * 1e6, "service_ms": _pct(service),
    }  # fmt: skip


def test_pooled_figures_are_those_of_every_round_together() -> None:
    rounds = [_result("tickserve", 1, 3000, 0.012), _result("tickserve", 2, 1000, 0.008)]
    pooled = pool(rounds)
    latency = np.concatenate([r["_latency"] for r in rounds])
    assert pooled["latency_ms"]["p99"] == float(np.percentile(latency, 99))
    assert pooled["cpu_us_per_tick"] == (0.012 + 0.008) / 4000 * 1e6  # not the mean of rounds
    assert (pooled["expected"], pooled["received"], pooled["lost"], pooled["duplicates"]) == (
        4000, 4002, 1, 2)  # fmt: skip
    assert pooled["rss_mb"] == 102.0 and pooled["sender_worst_lag_ms"] == 2
    assert pooled["dead_letters"] == {"late": 2}
    service = np.concatenate([r["_service"] for r in rounds])
    assert pooled["service_ms"]["p99"] == float(np.percentile(service, 99))
    assert pooled["signals_per_micro_batch"] == 4000 / (300 + 100)
    assert pool(rounds[:1]) is rounds[0]  # one round is its own measurement


def test_summary_names_the_rounds_each_floor_and_the_gate(tmp_path: Path) -> None:
    seeds = {"aiokafka": (3, 0.03), "confluent": (7, 0.02), "echo": (4, 0.01)}
    rounds = {
        name: [_result(name, seed, 500, cpu), _result(name, seed + 10, 500, cpu)]
        for name, (seed, cpu) in seeds.items()
    }
    systems = [_result("tickserve", 5, 500, 0.02), _result("tickserve", 6, 500, 0.02)]
    floors, svc = {name: pool(r) for name, r in rounds.items()}, pool(systems)
    fastest = fastest_independent(floors)
    independent = {n: floors[n]["latency_ms"]["p99"] for n in ("aiokafka", "confluent")}
    assert fastest == min(independent, key=independent.__getitem__)
    report = {
        "machine": {"cpus": 2, "git_commit": "abc"}, "config": {"partitions": "4"},
        "floors": {n: _public(f) for n, f in floors.items()},
        "ratio_over": {n: _ratios(f, svc) for n, f in floors.items()},
        "fastest_independent": fastest,
        "floor": _public(floors["echo"]), "tickserve": _public(svc),
        "ratio_over_floor": _ratios(floors["echo"], svc), "sweep": [], "max_sustainable": {},
        "rounds": [{"floors": {n: _public(r[k]) for n, r in rounds.items()},
                    "tickserve": _public(t),
                    "ratio_over": {n: _ratios(r[k], t) for n, r in rounds.items()}}
                   for k, t in enumerate(systems)],
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    text = summary(path)
    assert "x 2 rounds (pooled)" in text.splitlines()[0] and "4 partitions" in text
    for name in seeds:
        ratio = report["ratio_over"][name]
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"over {name} "))
        assert f"p99={ratio['p99']:.2f}" in line and f"cpu/tick={ratio['cpu_per_tick']:.2f}" in line
        assert ("the gate" in line) == (name == fastest)
    assert report["ratio_over"]["echo"]["cpu_per_tick"] == 0.02 / 0.01
    assert "round 2: tickserve p99=" in text
