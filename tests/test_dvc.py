"""`dvc repro` in a temporary copy of the project reproduces the whole training pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, TRADES

pytestmark = pytest.mark.services
STAGES = ["import", "features", "train", "evaluate", "register"]


def _copy_project(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        src = ROOT / name
        if src.is_file() and not name.startswith(("metrics/", "plots/", "mlruns/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "MLFLOW_"))}
    env = {**clean, "PATH": f"{Path(sys.executable).parent}:{clean['PATH']}",
           "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip


def test_dvc_repro_in_a_fresh_copy(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _copy_project(project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["input"] = str(TRADES)
    params["train"]["model"]["type"] = "logistic"
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    done = _dvc("repro", cwd=project)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in done.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    shown = _dvc("metrics", "show", "--json", cwd=project)
    assert shown.returncode == 0, shown.stderr
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    evaluated = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert evaluated["version"] == metrics["version"] == "1"
    # the registered ONNX model scores on its test window exactly what training measured
    assert evaluated["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    register = json.loads((project / "metrics" / "register.json").read_text())
    assert register["promoted"] in (0, 1)
    assert register["promoted"] == 1 or "test" in register["reasons"]
    assert {p.name for p in (project / "plots").iterdir()} >= {"equity_curve.png"}

    again = _dvc("repro", cwd=project)  # nothing changed: nothing runs
    assert again.returncode == 0 and "Running stage" not in again.stdout
    remote = tmp_path / "remote"
    assert _dvc("remote", "add", "-d", "local", str(remote), cwd=project).returncode == 0
    pushed = _dvc("push", cwd=project)
    assert pushed.returncode == 0, pushed.stderr
    assert any(p.is_file() for p in remote.rglob("*"))
