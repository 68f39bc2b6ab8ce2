"""DVC stage runner: `python -m deploy.pipeline STAGE` (import/features/train/evaluate/register).

Each stage reads its inputs from files DVC tracks and writes its outputs to files
(data/, metrics/, plots/); configuration comes from params.yaml and TICKSERVE_*. The
archive and the MLflow store live in `.tickserve-dvc/` unless TICKSERVE_STATE_DIR
(or TICKSERVE_CLICKHOUSE_DSN, MLFLOW_TRACKING_URI) say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from deploy.cli import _provenance, route_library_logs
from deploy.settings import Settings, load_settings
from tickserve.errors import TickserveError
from tickserve.logs import setup_logging
from training.params import TrainParams, load_params

TICKS = Path("data/ticks.parquet")
DATASET = Path("data/dataset.npz")
METRICS = Path("metrics")
PLOTS = Path("plots")
DEFAULT_STATE = Path(".tickserve-dvc")


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=float) + "\n")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def stage_import(settings: Settings, params: TrainParams, doc: dict[str, Any]) -> None:
    """Trade file -> validated archive -> data/ticks.parquet (what the features stage reads)."""
    from stream.ingest.archive import ClickHouseArchive
    from stream.ingest.backfill import import_file

    archive = ClickHouseArchive.open(settings.clickhouse)
    report = import_file(
        archive,
        Path(doc["data"]["input"]),
        doc["data"].get("symbol"),
        settings.max_future_ms * 1_000_000,
    )
    ticks = archive.read_ticks(doc["data"].get("symbols") or None)
    TICKS.parent.mkdir(parents=True, exist_ok=True)
    ticks.to_parquet(TICKS, index=False)
    _write(
        METRICS / "import.json",
        {
            "rows": report.rows,
            "inserted": report.inserted,
            "skipped": sum(report.skipped.values()),
            "archived": len(ticks),
        },
    )


def stage_features(settings: Settings, params: TrainParams, doc: dict[str, Any]) -> None:
    """data/ticks.parquet -> data/dataset.npz (the stream's kernels, forward labels)."""
    import pandas as pd

    from training.dataset import build_dataset

    ds = build_dataset(
        pd.read_parquet(TICKS), settings.feature_spec, horizon_bars=params.splits.horizon_bars
    )
    np.savez_compressed(
        DATASET,
        X=ds.X,
        y=ds.y,
        event_ns=ds.event_ns,
        symbols=ds.symbols.astype(str),
        label_end_ns=ds.label_end_ns,
        fwd_return=ds.fwd_return,
        tick_index=ds.tick_index,
        horizon_bars=ds.horizon_bars,
    )
    _write(
        METRICS / "features.json",
        {
            "rows": len(ds),
            "up_share": float(ds.y.mean()),
            "feature_spec_hash": settings.feature_spec.hash,
        },
    )


def _load_dataset() -> Any:
    from training.dataset import Dataset

    f = np.load(DATASET)
    return Dataset(
        f["X"],
        f["y"],
        f["event_ns"],
        f["symbols"].astype(object),
        f["label_end_ns"],
        f["fwd_return"],
        f["tick_index"],
        int(f["horizon_bars"]),
    )


def stage_train(settings: Settings, params: TrainParams, doc: dict[str, Any]) -> None:
    """data/dataset.npz -> a registered version, metrics/train.json, plots/*.png."""
    from training.cost import CostMeter, check_budget
    from training.train import train_and_register

    meter = CostMeter(params.cost)
    check_budget(settings.mlflow_uri, params.cost)
    result = train_and_register(
        _load_dataset(),
        settings.feature_spec,
        settings.mlflow_uri,
        settings.model_name,
        alias=None,
        params=params,
        provenance=_provenance(),
        meter=meter,
        figures_dir=PLOTS,
    )
    _write(METRICS / "train.json", {"version": result.version, **result.metrics})


def stage_evaluate(settings: Settings, params: TrainParams, doc: dict[str, Any]) -> None:
    """The registered ONNX model re-scored on its test window -> metrics/evaluate.json."""
    from training.gate import evaluate_version

    version = str(_read(METRICS / "train.json")["version"])
    metrics = evaluate_version(settings.mlflow_uri, settings.model_name, version)
    _write(
        METRICS / "evaluate.json",
        {"version": version, **{f"test_{k}": v for k, v in metrics.items()}},
    )


def stage_register(settings: Settings, params: TrainParams, doc: dict[str, Any]) -> None:
    """The validation gate -> alias champion or a refusal tag; metrics/register.json."""
    from training.gate import validate_version

    version = str(_read(METRICS / "train.json")["version"])
    decision = validate_version(
        settings.mlflow_uri, settings.model_name, params.gate, version, settings.model_alias
    )
    print(f"register: {decision.summary()}")
    _write(
        METRICS / "register.json",
        {
            "version": version,
            "promoted": int(decision.passed),
            "reasons": "; ".join(decision.reasons),
        },
    )


STAGES = {
    "import": stage_import,
    "features": stage_features,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "register": stage_register,
}


def main(argv: list[str] | None = None) -> int:
    """Run one stage; expected errors become one line and exit status 2."""
    import yaml

    parser = argparse.ArgumentParser(prog="python -m deploy.pipeline")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        state = {} if "TICKSERVE_STATE_DIR" in os.environ else {"state_dir": DEFAULT_STATE}
        route_library_logs()
        settings = load_settings(**state)
        setup_logging(settings.log_level)
        params = load_params(Path(args.params))
        doc = yaml.safe_load(Path(args.params).read_text()) or {}
        STAGES[args.stage](settings, params, doc)
    except TickserveError as exc:
        print(f"pipeline {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
