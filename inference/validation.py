"""Checks a loaded model version must pass before it may serve (pure: no registry I/O)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import orjson

from inference.session import OnnxScorer
from tickserve.errors import ModelRejected

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape (None for a dynamic dimension) and ONNX type of one model input/output."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class ModelContract:
    """The interface a serving model exposes; a new version must expose the same."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, scorer: OnnxScorer) -> ModelContract:
        """Read the contract off an ONNX Runtime session."""

        def spec(arg: object) -> TensorSpec:
            dims = tuple(d if isinstance(d, int) else None for d in arg.shape)  # type: ignore[attr-defined]
            return TensorSpec(arg.name, dims, arg.type)  # type: ignore[attr-defined]

        session = scorer.session
        return cls(
            tuple(spec(i) for i in session.get_inputs()),
            tuple(spec(o) for o in session.get_outputs()),
        )

    def mismatch(self, other: ModelContract) -> str | None:
        """Why `other` cannot replace a model with this contract, or None if it can."""
        for kind, mine, theirs in (
            ("inputs", self.inputs, other.inputs),
            ("outputs", self.outputs, other.outputs),
        ):
            if mine != theirs:
                show = "; ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in theirs)
                want = "; ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in mine)
                return f"{kind} are [{show}], the serving contract is [{want}]"
        return None


@dataclass(frozen=True, slots=True)
class GoldenRows:
    """Inputs and the P(up) the model produced for them at training time."""

    inputs: np.ndarray  # (n, n_features) float32
    p_up: np.ndarray  # (n,) float64

    @classmethod
    def parse(cls, raw: bytes, n_features: int) -> GoldenRows:
        """Parse `golden_rows.json` = {"inputs": [[...]], "p_up": [...]}.

        Raises:
            ModelRejected: Malformed, empty, or not `n_features` wide.
        """
        try:
            doc = orjson.loads(raw)
            inputs = np.asarray(doc["inputs"], np.float32)
            p_up = np.asarray(doc["p_up"], np.float64)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelRejected(f"golden rows unreadable: {exc}", reason="golden_missing") from exc
        if inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] != n_features:
            raise ModelRejected(
                f"golden inputs have shape {inputs.shape}, need (n>0, {n_features})",
                reason="golden_missing",
            )
        if p_up.shape != (inputs.shape[0],):
            raise ModelRejected(
                f"golden p_up has shape {p_up.shape} for {inputs.shape[0]} inputs",
                reason="golden_missing",
            )
        return cls(inputs, p_up)


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    """How strict the serving gate is.

    Attributes:
        golden_tolerance: Largest |P(up) - golden P(up)| accepted.
        warmup_rows: Rows per warm-up call (the batcher's max_batch is a good value).
        warmup_runs: Warm-up calls; all of them must fit in `warmup_budget_s`.
        warmup_budget_s: Time budget for the warm-up calls together.
    """

    golden_tolerance: float = 1e-5
    warmup_rows: int = 1000
    warmup_runs: int = 3
    warmup_budget_s: float = 2.0


def validate(
    scorer: OnnxScorer,
    golden: GoldenRows,
    policy: ValidationPolicy,
    contract: ModelContract | None = None,
) -> ModelContract:
    """Run every serving check on `scorer`; return its contract.

    Order: contract, finite outputs on the golden rows, golden parity, warm-up.

    Raises:
        ModelRejected: With `reason` one of contract, nonfinite, golden, warmup.
    """
    own = ModelContract.of(scorer)
    if contract is not None:
        why = contract.mismatch(own)
        if why is not None:
            raise ModelRejected(f"interface differs: {why}", reason="contract")
    feed = {scorer.input_name: golden.inputs}
    try:
        outputs = scorer.session.run(None, feed)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise ModelRejected(f"fails on the golden rows: {exc}", reason="golden") from exc
    for meta, out in zip(scorer.session.get_outputs(), outputs, strict=True):
        values = np.asarray(out)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise ModelRejected(
                f"output {meta.name} has {bad} NaN/inf values on the golden rows",
                reason="nonfinite",
            )
    p_up = scorer.score(golden.inputs)
    gap = float(np.max(np.abs(p_up - golden.p_up)))
    if not gap <= policy.golden_tolerance:
        raise ModelRejected(
            f"P(up) differs from the golden rows by {gap:.3g} > {policy.golden_tolerance:g}",
            reason="golden",
        )
    reps = math.ceil(policy.warmup_rows / golden.inputs.shape[0])
    warm = np.ascontiguousarray(np.tile(golden.inputs, (reps, 1))[: policy.warmup_rows])
    started = time.perf_counter()
    for _ in range(policy.warmup_runs):
        scorer.score(warm)
        scorer.score(golden.inputs[:1])
    took = time.perf_counter() - started
    if took > policy.warmup_budget_s:
        raise ModelRejected(
            f"warm-up took {took:.3f} s > budget {policy.warmup_budget_s:g} s", reason="warmup"
        )
    return own
