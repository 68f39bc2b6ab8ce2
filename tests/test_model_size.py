"""A model file over the size limit is refused (reason `size`) before it is downloaded."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest
from mlflow.entities import FileInfo

from features.spec import FeatureSpec
from inference.batcher import MicroBatcher
from inference.registry import fetch_version, open_client, resolve_alias
from inference.session import OnnxScorer
from inference.testing import golden_for, make_onnx_classifier, register_version, with_ballast
from inference.watcher import CHAMPION, REJECTIONS, ModelWatcher, WatcherConfig
from tickserve.errors import ModelRejected

SPEC = FeatureSpec()
MIB = 2**20
LIMIT = MIB  # the small models are a few KB, the heavy one carries 2 MiB


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every MLflow artifact download (its keyword arguments), then do it."""
    calls: list[dict[str, Any]] = []
    download = mlflow.artifacts.download_artifacts

    def counting(**kwargs: Any) -> str:
        calls.append(kwargs)
        return download(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    return calls


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every ONNX file opened with ONNX Runtime, then open it."""
    sizes: list[int] = []
    from_bytes = OnnxScorer.from_bytes

    def counting(onnx_bytes: bytes, *args: Any) -> OnnxScorer:
        sizes.append(len(onnx_bytes))
        return from_bytes(onnx_bytes, *args)

    monkeypatch.setattr(OnnxScorer, "from_bytes", counting)
    return sizes


def _rejected(reason: str) -> float:
    return float(REJECTIONS.labels(CHAMPION, reason)._value.get())


def test_the_watcher_refuses_a_version_over_the_limit_unread_and_takes_one_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uri, name, n = f"sqlite:///{tmp_path}/mlflow.db", "sized", SPEC.n_features
    base = make_onnx_classifier(n, "logistic", seed=1)
    small = register_version(uri, name, base, SPEC.hash, golden_for(base, n), alias=CHAMPION)
    huge = register_version(uri, name, with_ballast(base, 2 * MIB), SPEC.hash, golden_for(base, n))
    other = make_onnx_classifier(n, "logistic", seed=2)
    under = register_version(uri, name, other, SPEC.hash, golden_for(other, n))
    client = open_client(uri)
    config = WatcherConfig(uri, name, prefer_gpu=False, numba_kernels=False, max_model_bytes=LIMIT)
    watcher = ModelWatcher(config, SPEC)
    batcher = MicroBatcher(watcher.load_initial(), n)
    downloads, loads = _count_downloads(monkeypatch), _count_loads(monkeypatch)
    try:
        client.set_registered_model_alias(name, CHAMPION, huge)
        before = _rejected("size")
        with caplog.at_level(logging.ERROR, logger="inference.watcher"):
            asyncio.run(watcher.poll_once(batcher))
        assert _rejected("size") == before + 1
        assert batcher.model.version == small  # the old version keeps serving
        assert watcher.refused(CHAMPION) == huge
        assert (downloads, loads) == ([], [])  # neither its file nor its golden rows
        [record] = [r for r in caplog.records if getattr(r, "reason", None) == "size"]
        assert record.version == huge  # type: ignore[attr-defined]
        assert "2.0 MiB" in record.detail and "1 MiB limit" in record.detail  # type: ignore[attr-defined]

        client.set_registered_model_alias(name, CHAMPION, under)
        asyncio.run(watcher.poll_once(batcher))
        assert batcher.model.version == under
        assert _rejected("size") == before + 1
        assert len(loads) == 1 and loads[0] < LIMIT
    finally:
        watcher.close()


def test_without_a_listed_size_the_downloaded_file_is_measured_before_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, name, n = f"sqlite:///{tmp_path}/mlflow.db", "unsized", SPEC.n_features
    base = make_onnx_classifier(n, "logistic", seed=1)
    small = register_version(uri, name, base, SPEC.hash, None)
    huge = register_version(uri, name, with_ballast(base, 2 * MIB), SPEC.hash, None)
    list_artifacts = mlflow.artifacts.list_artifacts

    def unsized(**kwargs: Any) -> list[FileInfo]:  # as a store whose listing has no sizes
        return [FileInfo(f.path, f.is_dir, None) for f in list_artifacts(**kwargs)]

    monkeypatch.setattr(mlflow.artifacts, "list_artifacts", unsized)
    downloads, loads = _count_downloads(monkeypatch), _count_loads(monkeypatch)
    client = open_client(uri)
    client.set_registered_model_alias(name, CHAMPION, huge)
    with pytest.raises(ModelRejected) as rejected:
        fetch_version(uri, resolve_alias(client, name, CHAMPION), SPEC, False, max_bytes=LIMIT)
    assert (rejected.value.reason, rejected.value.version) == ("size", huge)
    assert len(downloads) == 1 and loads == []  # fetched, measured, never opened

    client.set_registered_model_alias(name, CHAMPION, small)
    model = fetch_version(uri, resolve_alias(client, name, CHAMPION), SPEC, False, max_bytes=LIMIT)
    assert model.version == small and len(loads) == 1
