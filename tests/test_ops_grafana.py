"""Grafana provisioning: the dashboard's queries parse in a real Prometheus and name only the
service's metrics or the SLO recording rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from deploy.stack import free_port
from tests.helpers import ROOT

GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "rules"
# The worker's and the monitor's metrics (docs/operations.md), plus what Prometheus adds
METRICS = {
    "predictions_total",
    "prediction_latency_seconds_bucket",
    "stage_latency_seconds_bucket",
    "micro_batch_size_bucket",
    "consumer_lag",
    "ticks_total",
    "dead_letters_total",
    "model_swaps_total",
    "model_rejections_total",
    "model_serving_version",
    "online_store_freshness_seconds_bucket",
    "tickserve_build_info",
    "last_progress_timestamp_seconds",
    "training_cost_usd_last_run",
    "training_cost_usd_month_to_date",
    "training_gpu_seconds_last_run",
    "model_directional_accuracy",
    "feature_psi",
    "up",
}


def _dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "tickserve.json").read_text())  # type: ignore[no-any-return]


def _queries() -> list[str]:
    dash = _dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dash["annotations"]["list"]]


def _recorded() -> set[str]:
    return {
        rule["record"]
        for path in RULES.glob("*.rules.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def _names(expr: str) -> set[str]:
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)', " ", expr)
    return {
        name
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\(|[a-zA-Z0-9_:])", bare)
        if name not in {"by", "without", "and", "or", "unless", "on", "ignoring"}
    }


def test_every_panel_queries_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_queries_name_only_known_metrics() -> None:
    known = METRICS | _recorded()
    for expr in _queries():
        assert _names(expr), expr
        assert _names(expr) <= known, (expr, _names(expr) - known)


def test_the_name_check_catches_a_typo() -> None:
    assert _names("sum by (le) (rate(prediction_latncy_seconds_bucket[5m]))") == {
        "prediction_latncy_seconds_bucket"
    }


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: apt-get install -y prometheus"
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text("global: {}\n")
    port = free_port()
    with (tmp / "log").open("w") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/-/ready", timeout=1).close()  # noqa: S310
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp / "log").read_text()
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def _query(url: str, expr: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as answer:  # noqa: S310
            return json.loads(answer.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())  # type: ignore[no-any-return]


def test_every_query_parses(prometheus: str) -> None:
    for expr in _queries():
        answer = _query(prometheus, expr)
        assert answer["status"] == "success", (expr, answer.get("error"))
    assert _query(prometheus, "sum(rate(ticks_total[5m])")["errorType"] == "bad_data"
