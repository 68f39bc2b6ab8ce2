"""Training parameters (`params.yaml`, shared with DVC), read once into frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tickserve.errors import ConfigError

MODEL_TYPES = ("logistic", "hgb", "hgb-gemm", "mlp")  # hgb-gemm: hgb for a GPU


@dataclass(frozen=True, slots=True)
class SplitParams:
    """Purged walk-forward folds: the last fold is the test window, the others validate."""

    n_folds: int = 4
    horizon_bars: int = 1
    purge_bars: int = 1
    embargo_bars: int = 2


@dataclass(frozen=True, slots=True)
class BacktestParams:
    """Position = sign(p - 0.5) where |p - 0.5| > threshold; fees per unit of turnover."""

    threshold: float = 0.02
    fee_bps: float = 2.0


@dataclass(frozen=True, slots=True)
class GateParams:
    """What a version must reach to become champion, and by how much it may trail it."""

    min_accuracy: float = 0.54
    min_sharpe: float = 1.0
    accuracy_margin: float = 0.0
    sharpe_margin: float = 0.0


@dataclass(frozen=True, slots=True)
class CostParams:
    """Hourly prices of the training machine and the monthly budget (USD)."""

    cpu_hour_usd: float = 0.10
    gpu_hour_usd: float = 2.50
    monthly_budget_usd: float = 50.0


@dataclass(frozen=True, slots=True)
class TrainParams:
    """Everything `tickserve train` needs besides the data and the FeatureSpec."""

    model_type: str = "logistic"
    logistic: dict[str, Any] = field(default_factory=lambda: {"C": 1.0, "max_iter": 1000})
    hgb: dict[str, Any] = field(
        default_factory=lambda: {
            "max_iter": 200,
            "learning_rate": 0.05,
            "max_leaf_nodes": 15,
            "min_samples_leaf": 50,
            "l2_regularization": 1.0,
            "random_state": 7,
        }
    )
    mlp: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_layer_sizes": [256, 256],
            "alpha": 1e-3,
            "learning_rate_init": 1e-3,
            "max_iter": 50,
            "early_stopping": True,
            "random_state": 7,
        }
    )
    splits: SplitParams = field(default_factory=SplitParams)
    backtest: BacktestParams = field(default_factory=BacktestParams)
    gate: GateParams = field(default_factory=GateParams)
    cost: CostParams = field(default_factory=CostParams)

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters of the chosen model type (hgb-gemm: those of hgb)."""
        if self.model_type == "logistic":
            return dict(self.logistic)
        return dict(self.mlp if self.model_type == "mlp" else self.hgb)


def _section(cls: type, doc: Any, where: str) -> Any:
    if doc is None:
        return cls()
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping, got {doc!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(doc) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        return cls(**{k: type(getattr(cls(), k))(v) for k, v in doc.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_params(doc: dict[str, Any], where: str = "params") -> TrainParams:
    """TrainParams from the `train` mapping of params.yaml (missing keys take defaults)."""
    train = doc.get("train", {}) or {}
    model = train.get("model", {}) or {}
    model_type = model.get("type", "logistic")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: train.model.type must be one of {MODEL_TYPES}, got {model_type!r}"
        )
    defaults = TrainParams()
    params = TrainParams(
        model_type=model_type,
        logistic={**defaults.logistic, **(model.get("logistic") or {})},
        hgb={**defaults.hgb, **(model.get("hgb") or {})},
        mlp={**defaults.mlp, **(model.get("mlp") or {})},
        splits=_section(SplitParams, train.get("splits"), f"{where}: train.splits"),
        backtest=_section(BacktestParams, train.get("backtest"), f"{where}: train.backtest"),
        gate=_section(GateParams, train.get("gate"), f"{where}: train.gate"),
        cost=_section(CostParams, train.get("cost"), f"{where}: train.cost"),
    )
    s = params.splits
    if s.embargo_bars < s.horizon_bars + 1:
        raise ConfigError(
            f"{where}: train.splits.embargo_bars ({s.embargo_bars}) must cover the label "
            f"window (horizon_bars + 1 = {s.horizon_bars + 1})"
        )
    return params


def load_params(path: Path) -> TrainParams:
    """Read params.yaml; a missing file or bad value is a ConfigError naming it."""
    import yaml

    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_params(doc, str(path))
