"""MicroBatcher: one deadline-aware queue in front of the serving ONNX model (and its challenger).

Two ways in, one queue, one model reference:

- the stream worker hands over a whole micro-batch (`score_batch`, synchronous): rows
  already waiting from HTTP requests are scored first, then the micro-batch in chunks of
  `max_batch`, all by the same model;
- an HTTP request adds one row (`score_row`, awaited): the queue is scored when it holds
  `max_batch` rows or `max_delay_us` after its first row, whichever comes first.

Everything runs on the event loop thread, and scoring a queue never awaits, so a model
swapped in by `swap` (also on the loop) takes effect between two batches: no batch, and
no stream micro-batch, is ever scored by two versions. Rows are copied into one
preallocated float32 buffer (the tensor ONNX Runtime reads); no Python object is made
per row on the stream path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from inference.registry import LoadedModel
from tickserve.errors import ConfigError, StaleRow

logger = logging.getLogger(__name__)

STALE_ROWS = Counter(
    "batcher_stale_rows_total", "Rows dropped unscored because they were older than the deadline"
)
BATCHES = Counter("batcher_batches_total", "Batches scored by the champion model")
QUEUE_WAIT = Histogram(
    "batcher_queue_wait_seconds",
    "Time the oldest queued (HTTP) row waited before its batch was scored",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
SHADOW_ERRORS = Counter("challenger_errors_total", "Challenger batches that failed to score")


@dataclass(frozen=True, slots=True)
class BatcherConfig:
    """Batching knobs.

    Attributes:
        max_batch: Rows per ONNX call at most; a queue this long is scored at once.
        max_delay_us: A queued row waits at most this long for others to join it.
        stale_ns: A row whose origin time is further in the past than this when its
            batch closes is dropped and counted (0: never drop).
    """

    max_batch: int = 1000
    max_delay_us: int = 500
    stale_ns: int = 0

    def __post_init__(self) -> None:
        """Reject knobs that cannot work."""
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_delay_us < 0 or self.stale_ns < 0:
            raise ConfigError("max_delay_us and stale_ns must be >= 0")


@dataclass(frozen=True, slots=True)
class BatchScores:
    """Scores for the rows of one `score_batch` call, in the order given.

    Attributes:
        scores: (n,) float64 P(up); NaN where the row was stale.
        stale: (n,) bool, rows dropped for age.
        model: The version that scored every row of the call.
        shadow: (n,) float64 challenger P(up) (NaN where stale or failed), or None.
        challenger: The challenger version behind `shadow`, or None.
    """

    scores: np.ndarray
    stale: np.ndarray
    model: LoadedModel
    shadow: np.ndarray | None = None
    challenger: LoadedModel | None = None


@dataclass(frozen=True, slots=True)
class RowScore:
    """The answer to one queued row (HTTP)."""

    score: float
    model: LoadedModel
    queued_ns: int


class ScoreHealth:
    """How many rows the serving version scored, and how many of them came out non-finite.

    A version can pass every check on its golden rows and still return NaN for inputs
    the stream brings; the watcher rolls such a version back (`ModelWatcher`).
    """

    def __init__(self, version: str) -> None:
        """Counts for `version`, from zero."""
        self.version = version
        self.scored = 0
        self.non_finite = 0

    def count(self, version: str, scores: np.ndarray) -> None:
        """Add a batch's scores (of the rows the model saw) if they are `version`'s."""
        if version == self.version:
            self.scored += len(scores)
            self.non_finite += len(scores) - int(np.isfinite(scores).sum())

    @property
    def rate(self) -> float:
        """Share of scored rows that were not finite (0 before any)."""
        return self.non_finite / self.scored if self.scored else 0.0


class MicroBatcher:
    """A deadline-aware micro-batcher over a swappable champion and optional challenger."""

    def __init__(
        self,
        model: LoadedModel,
        n_features: int,
        config: BatcherConfig | None = None,
        challenger: LoadedModel | None = None,
    ) -> None:
        """Allocate the buffers once for `config.max_batch` rows of `n_features`."""
        self.config = config or BatcherConfig()
        self.n_features = n_features
        self.model = model
        self.challenger = challenger
        size = self.config.max_batch
        self._batch = np.empty((size, n_features), np.float32)  # the tensor ONNX reads
        self._fresh = np.empty(size, np.bool_)
        self._none_stale = np.zeros(size, np.bool_)  # read-only: "no row was stale"
        self._none_stale.flags.writeable = False
        self._queue = np.empty((size, n_features), np.float32)  # rows waiting (HTTP)
        self._queue_origin = np.empty(size, np.int64)
        self._waiters: list[asyncio.Future[RowScore]] = []
        self._queued_since = 0
        self._timer: asyncio.TimerHandle | None = None
        self._delay_s = self.config.max_delay_us / 1e6
        self.health = ScoreHealth(model.version)

    # -- model references (call on the loop thread: a swap lands between two batches) --

    def swap(self, model: LoadedModel) -> LoadedModel:
        """Serve `model` from the next batch on; returns the one it replaces."""
        old, self.model = self.model, model
        self.health = ScoreHealth(model.version)
        logger.info(
            "champion swapped",
            extra={"model": model.name, "version": model.version, "previous": old.version},
        )
        return old

    def set_challenger(self, model: LoadedModel | None) -> None:
        """Score `model` in shadow on every batch from the next one on (None: stop)."""
        self.challenger = model
        logger.info("challenger set", extra={"version": model.version if model else None})

    # -- the stream path ---------------------------------------------------------------

    def score_batch(self, rows: np.ndarray, origin_ns: np.ndarray) -> BatchScores:
        """Score a whole micro-batch now (after any rows already queued).

        Args:
            rows: (n, n_features) feature rows, any float dtype.
            origin_ns: (n,) int64 wall-clock ns each row's age is measured from.
        """
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(f"rows must be (n, {self.n_features}), got {rows.shape}")
        if self._waiters:
            self._flush_queue()
        model, challenger = self.model, self.challenger
        n = rows.shape[0]
        if n <= self.config.max_batch and not self.config.stale_ns and challenger is None:
            # the common case, kept short: one copy into the tensor, one call
            batch = self._batch[:n]
            np.copyto(batch, rows, casting="same_kind")
            fresh_scores = model.scorer.score(batch)
            BATCHES.inc()
            self.health.count(model.version, fresh_scores)
            return BatchScores(fresh_scores, self._none_stale[:n], model)
        scores = np.full(n, np.nan)
        stale = np.zeros(n, np.bool_)
        shadow = np.full(n, np.nan) if challenger is not None else None
        step = self.config.max_batch
        for start in range(0, n, step):
            end = min(start + step, n)
            self._score_chunk(
                rows[start:end],
                origin_ns[start:end],
                model,
                challenger,
                scores[start:end],
                stale[start:end],
                None if shadow is None else shadow[start:end],
            )
        self.health.count(model.version, scores[~stale])
        return BatchScores(scores, stale, model, shadow, challenger)

    # -- the request path --------------------------------------------------------------

    async def score_row(self, row: np.ndarray, origin_ns: int | None = None) -> RowScore:
        """Queue one row and wait for the batch that scores it.

        Raises:
            StaleRow: The row was older than the staleness deadline when its batch closed.
        """
        return await self.submit_row(row, origin_ns)

    def submit_row(self, row: np.ndarray, origin_ns: int | None = None) -> asyncio.Future[RowScore]:
        """Queue one row (call on the loop thread); the future resolves when it is scored."""
        if row.shape != (self.n_features,):
            raise ValueError(f"row must have {self.n_features} features, got {row.shape}")
        loop = asyncio.get_running_loop()
        n = len(self._waiters)
        if n == 0:
            self._queued_since = time.perf_counter_ns()
            self._timer = loop.call_later(_early(self._delay_s), self._on_deadline)
        self._queue[n] = row
        self._queue_origin[n] = time.time_ns() if origin_ns is None else origin_ns
        waiter: asyncio.Future[RowScore] = loop.create_future()
        self._waiters.append(waiter)
        if n + 1 == self.config.max_batch:
            self._flush_queue()
        return waiter

    def _on_deadline(self) -> None:
        """Timer callback: flush, unless the loop's timer fired before the deadline.

        Timers are armed early (see `_early`) and re-armed for what is left, which
        holds the batch open until the real deadline (the loop keeps serving I/O
        meanwhile) and closes it within about one loop iteration of it.
        """
        remaining_ns = self._queued_since + self.config.max_delay_us * 1000 - time.perf_counter_ns()
        if remaining_ns > 0 and self._waiters:
            self._timer = asyncio.get_running_loop().call_later(
                _early(remaining_ns / 1e9), self._on_deadline
            )
            return
        self._flush_queue()

    def _flush_queue(self) -> None:
        """Score every queued row with the current model and answer its waiter."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, []
        n = len(waiters)
        if n == 0:
            return
        QUEUE_WAIT.observe((time.perf_counter_ns() - self._queued_since) / 1e9)
        model = self.model
        scores = np.full(n, np.nan)
        stale = np.zeros(n, np.bool_)
        self._score_chunk(self._queue[:n], self._queue_origin[:n], model, None, scores, stale, None)
        queued_ns = self._queued_since
        for i, waiter in enumerate(waiters):
            if waiter.done():  # the request was cancelled (client went away)
                continue
            if stale[i]:
                waiter.set_exception(StaleRow("row went stale in the queue"))
            else:
                waiter.set_result(RowScore(float(scores[i]), model, queued_ns))

    # -- one ONNX call -----------------------------------------------------------------

    def _score_chunk(
        self,
        rows: np.ndarray,
        origin_ns: np.ndarray,
        model: LoadedModel,
        challenger: LoadedModel | None,
        scores: np.ndarray,
        stale: np.ndarray,
        shadow: np.ndarray | None,
    ) -> None:
        """Drop stale rows, copy the rest into the batch tensor, score, scatter back."""
        n = rows.shape[0]
        stale_ns = self.config.stale_ns
        if stale_ns:
            fresh = self._fresh[:n]
            np.greater_equal(origin_ns, time.time_ns() - stale_ns, out=fresh)
            k = int(np.count_nonzero(fresh))
            if k < n:
                np.logical_not(fresh, out=stale)
                STALE_ROWS.inc(n - k)
                if k == 0:
                    return
                batch = self._batch[:k]
                # not np.compress(..., out=batch): into an `out` of another dtype it
                # first casts what `out` holds, and leftover bytes that read as a
                # signalling NaN raise "invalid value encountered in cast"
                np.copyto(batch, rows[fresh], casting="same_kind")
                scores[fresh] = model.scorer.score(batch)
                if shadow is not None and challenger is not None:
                    shadow[fresh] = self._shadow_scores(challenger, batch)
                BATCHES.inc()
                return
        batch = self._batch[:n]
        np.copyto(batch, rows, casting="same_kind")
        scores[:] = model.scorer.score(batch)
        if shadow is not None and challenger is not None:
            shadow[:] = self._shadow_scores(challenger, batch)
        BATCHES.inc()

    @staticmethod
    def _shadow_scores(challenger: LoadedModel, batch: np.ndarray) -> np.ndarray:
        """Challenger scores; a failing challenger never disturbs the champion."""
        try:
            return challenger.scorer.score(batch)
        except Exception:  # onnxruntime raises several unrelated types
            SHADOW_ERRORS.inc()
            logger.exception("challenger failed", extra={"version": challenger.version})
            return np.full(batch.shape[0], np.nan)


def _early(delay_s: float) -> float:
    """A timer delay 1 ms short of `delay_s`: the last millisecond is polled.

    uvloop (libuv) keeps timers in whole milliseconds, rounded, against a clock read
    once per loop iteration, so a timer can fire most of a millisecond late; one
    armed 1 ms early and then re-armed at 0 (the next iteration) until the deadline
    passes closes the batch on time.
    """
    return max(delay_s - 0.001, 0.0)
