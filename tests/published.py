"""Upstream schemas for the deploy/ checks, taken from registry packages into a local cache.

Nothing upstream is committed here: the compose specification's JSON schema comes from the
PyPI wheel of `check-jsonschema` (which vendors it as a builtin schema), the KEDA and
prometheus-operator custom resources are checked by the npm packages of kubernetes-models
(validators compiled from the CRDs' openAPIV3Schema), run by node. Both are downloaded once
into ~/.cache/tickserve/published/ with the registries' own clients (pip, npm); where a client
or the registry cannot be reached the caller skips, with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

CACHE = Path.home() / ".cache" / "tickserve" / "published"
# check-jsonschema vendors compose-spec/compose-spec's schema/compose-spec.json
CHECK_JSONSCHEMA = "0.39.0"
COMPOSE_SPEC = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
CRD_PACKAGES = ("@kubernetes-models/keda@2.0.0", "@kubernetes-models/prometheus-operator@6.0.0")
NODE_VALIDATE = Path(__file__).with_name("crd_validate.mjs")


class Unavailable(Exception):
    """A package could not be had (no client, no registry): the reason, for a skip."""


def compose_spec_schema() -> dict[str, Any]:
    """The compose specification's JSON schema, from the check-jsonschema wheel."""
    folder = CACHE / f"check-jsonschema-{CHECK_JSONSCHEMA}"
    wheels = sorted(folder.glob("check_jsonschema-*.whl"))
    if not wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest"]
            + [str(folder), f"check-jsonschema=={CHECK_JSONSCHEMA}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        wheels = sorted(folder.glob("check_jsonschema-*.whl"))
        if done.returncode or not wheels:
            msg = f"pip download check-jsonschema=={CHECK_JSONSCHEMA} failed: {done.stderr[-300:]}"
            raise Unavailable(msg)
    with zipfile.ZipFile(wheels[0]) as wheel:
        return json.loads(wheel.read(COMPOSE_SPEC))  # type: ignore[no-any-return]


def _installed(folder: Path, package: str) -> bool:
    name, version = package.rsplit("@", 1)
    manifest = folder / "node_modules" / name / "package.json"
    return manifest.exists() and json.loads(manifest.read_text())["version"] == version


def _crd_models() -> Path:
    """The folder whose node_modules hold the kubernetes-models packages (npm install once)."""
    folder = CACHE / "crd-models"
    if all(_installed(folder, package) for package in CRD_PACKAGES):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm not found: the CRD schemas come from npm packages")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), *CRD_PACKAGES],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode:
        raise Unavailable(f"npm install {' '.join(CRD_PACKAGES)} failed: {done.stderr[-300:]}")
    return folder


def crd_errors(objects: list[dict[str, Any]]) -> list[list[str]]:
    """Per object (ScaledObject, ServiceMonitor, PrometheusRule): its schema errors."""
    node = shutil.which("node")
    if node is None:
        raise Unavailable("node not found: the CRD validators are npm packages")
    folder = _crd_models()
    # an .mjs copied beside node_modules resolves the packages from there
    script = folder / NODE_VALIDATE.name
    if not script.exists() or script.read_bytes() != NODE_VALIDATE.read_bytes():
        shutil.copyfile(NODE_VALIDATE, script)
    done = subprocess.run(
        [node, str(script)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]
