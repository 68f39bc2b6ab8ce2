"""EngineRouter: each micro-batch scored by the CPU or the GPU engine, whichever measured cheaper.

A GPU pays a fixed cost per call (kernel launches, two copies over PCIe, a
synchronisation) that a CPU engine does not, and gains per row; so below some batch
size the CPU is faster and above it the GPU. That size depends on the model, the
machine and the engines, so it is measured, not configured: at start-up (and for each
version swapped in) both engines score batches of every power-of-two size up to the
batcher's largest, and the crossover is the smallest size from which the GPU is
cheaper at every larger size too. From then on a batch of `n` rows goes to the GPU
when ``n >= crossover`` and to the CPU otherwise.

The GPU engine is fenced like every fast path here: it serves only after it scored
probe rows within `GPU_TOLERANCE` of the CPU engine; otherwise, or where there is no
usable GPU, every batch stays on the CPU and `describe` says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from prometheus_client import Counter

logger = logging.getLogger(__name__)

# the golden-row tolerance: a GPU sums in another order than the CPU, never further off
GPU_TOLERANCE = 1e-5

ROUTED = Counter("scorer_engine_batches_total", "Batches scored per engine", ["engine"])
_ROUTED_CPU = ROUTED.labels("cpu")
_ROUTED_GPU = ROUTED.labels("gpu")


class Engine(Protocol):
    """Something that scores rows: P(up) per row of (n, n_features) float32."""

    @property
    def name(self) -> str:
        """What GET /model calls it, e.g. "tree-kernel" or "cuda-graphs"."""
        ...

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row, float64."""
        ...


@dataclass(frozen=True, slots=True)
class FunctionEngine:
    """An engine made of a name and a scoring function (a kernel's or a session's `score`)."""

    name: str
    function: Callable[[np.ndarray], np.ndarray]

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row."""
        return self.function(rows)


@dataclass(frozen=True, slots=True)
class EngineCosts:
    """Median microseconds per call of each engine, per batch size measured."""

    batches: tuple[int, ...]
    cpu_us: tuple[float, ...]
    gpu_us: tuple[float, ...]

    @property
    def crossover(self) -> int | None:
        """Smallest batch size from which the GPU is cheaper at every size measured; None: never.

        >>> cpu, gpu = (5.0, 9.0, 40.0, 300.0), (60.0, 61.0, 30.0, 70.0)
        >>> EngineCosts((1, 8, 64, 512), cpu, gpu).crossover
        64
        >>> EngineCosts((1, 8), (5.0, 9.0), (60.0, 8.0)).crossover
        8
        >>> EngineCosts((1, 8), (5.0, 9.0), (60.0, 61.0)).crossover is None
        True
        """
        crossover = None
        for batch, cpu, gpu in zip(
            reversed(self.batches), reversed(self.cpu_us), reversed(self.gpu_us), strict=True
        ):
            if gpu >= cpu:
                break
            crossover = batch
        return crossover


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first that holds `max_batch` rows.

    >>> bucket_sizes(1000)
    (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    >>> bucket_sizes(1)
    (1,)
    """
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def median_us(
    engine: Engine,
    rows: np.ndarray,
    rounds: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> float:
    """Median microseconds of `engine.score(rows)` over `rounds` calls, after 3 unmeasured."""
    for _ in range(3):
        engine.score(rows)
    times = np.empty(rounds)
    for i in range(rounds):
        started = clock()
        engine.score(rows)
        times[i] = clock() - started
    return float(np.median(times)) / 1e3


def measure_costs(
    cpu: Engine,
    gpu: Engine,
    batches: tuple[int, ...],
    n_features: int,
    rounds: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> EngineCosts:
    """Both engines timed on the same random rows at each batch size."""
    rows = np.random.default_rng(0).normal(size=(max(batches), n_features)).astype(np.float32)
    cpu_us = tuple(median_us(cpu, rows[:b], rounds, clock) for b in batches)
    gpu_us = tuple(median_us(gpu, rows[:b], rounds, clock) for b in batches)
    return EngineCosts(batches, cpu_us, gpu_us)


def probe_gap(cpu: Engine, gpu: Engine, n_features: int) -> float:
    """Largest |P(up)| gap between the engines on random rows and rows of zeros."""
    rng = np.random.default_rng(1)
    probe = np.concatenate(
        [
            rng.normal(size=(500, n_features)),
            3.0 * rng.normal(size=(12, n_features)),
            np.zeros((1, n_features)),
        ]
    ).astype(np.float32)
    gap = np.abs(np.asarray(gpu.score(probe)) - np.asarray(cpu.score(probe)))
    return float(np.max(gap))  # NaN if either side gave NaN: compared below as "not <="


class EngineRouter:
    """Scores each batch on the CPU engine below `crossover` rows, on the GPU engine from it on."""

    def __init__(
        self,
        cpu: Engine,
        gpu: Engine | None = None,
        crossover: int | None = None,
        reason: str = "",
        costs: EngineCosts | None = None,
    ) -> None:
        """A router; `gpu` None or `crossover` None keeps every batch on the CPU."""
        self.cpu = cpu
        self.gpu = gpu if crossover is not None else None
        self.crossover = crossover if gpu is not None else None
        self.reason = reason
        self.costs = costs
        # the GPU engine, and the size from which it scores: a never-taken path if none
        self._gpu = self.gpu or cpu
        self._from = self.crossover if self.crossover is not None else 1 << 62

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows`, from the engine the batch size calls for."""
        if rows.shape[0] >= self._from:
            _ROUTED_GPU.inc()
            return self._gpu.score(rows)
        _ROUTED_CPU.inc()
        return self.cpu.score(rows)

    def describe(self) -> dict[str, Any]:
        """What GET /model shows: the engines, the crossover, why, and the costs measured."""
        costs = None
        if self.costs is not None:
            c = self.costs
            costs = {
                str(b): {"cpu_us": round(cu, 1), "gpu_us": round(gu, 1)}
                for b, cu, gu in zip(c.batches, c.cpu_us, c.gpu_us, strict=True)
            }
        return {
            "engines": {"cpu": self.cpu.name, "gpu": self.gpu.name if self.gpu else None},
            "crossover_batch": self.crossover,
            "reason": self.reason,
            "costs_us": costs,
        }


@dataclass(frozen=True, slots=True)
class GpuPolicy:
    """How the GPU path is set up where a GPU is usable.

    Attributes:
        cuda_graphs: Run the GPU engine as CUDA graphs, one per batch-size bucket
            (else one session with I/O binding).
        max_batch: Largest batch the batcher hands over; buckets go up to it.
        rounds: Timed calls per engine and bucket when measuring the crossover.
    """

    cuda_graphs: bool = True
    max_batch: int = 1000
    rounds: int = 20


def build_router(
    cpu: Engine,
    make_gpu: Callable[[], Engine] | None,
    n_features: int,
    policy: GpuPolicy,
    no_gpu_reason: str = "no GPU",
    clock: Callable[[], int] = time.perf_counter_ns,
) -> EngineRouter:
    """Build the GPU engine, fence it on probe rows, measure both, route by the crossover.

    Any failure along the way leaves a CPU-only router whose `reason` says what failed.
    """
    if make_gpu is None:
        return EngineRouter(cpu, reason=no_gpu_reason)
    try:
        gpu = make_gpu()
    except Exception as exc:  # onnxruntime and the CUDA runtime raise several unrelated types
        logger.warning("GPU engine not built; CPU scores", extra={"error": str(exc)})
        return EngineRouter(cpu, reason=f"GPU engine failed to build: {exc}".splitlines()[0])
    gap = probe_gap(cpu, gpu, n_features)
    if not gap <= GPU_TOLERANCE:
        logger.warning("GPU engine disagrees on probe rows; CPU scores", extra={"gap": gap})
        return EngineRouter(cpu, reason=f"GPU scores differ from the CPU's by {gap:.2g}")
    costs = measure_costs(
        cpu, gpu, bucket_sizes(policy.max_batch), n_features, policy.rounds, clock
    )
    crossover = costs.crossover
    reason = (
        f"measured: GPU cheaper from {crossover} rows on"
        if crossover is not None
        else "measured: GPU never cheaper up to the largest batch"
    )
    logger.info(
        "engine crossover measured",
        extra={"cpu": cpu.name, "gpu": gpu.name, "crossover_batch": crossover},
    )
    return EngineRouter(cpu, gpu, crossover, reason, costs)
