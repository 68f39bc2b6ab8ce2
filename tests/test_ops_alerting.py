"""Monitoring end to end: a real Prometheus with the real rules scrapes a running worker, a
real Alertmanager with the real routing delivers the latency burn page to a webhook here, and
the Grafana dashboard's panels return data from that Prometheus.

The latency budget is overridden to 0.5 ms (bucket le="0.0005") so that live ticks breach it;
everything else (windows, burn rates, routes, group_wait) is as shipped. The test prints the
time from the first breaching tick to the page's delivery.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from deploy.stack import free_port
from stream.ingest.feed import publish
from tests.faults.harness import Worker
from tests.helpers import HISTORY, ROOT, Pipeline, fresh, run, unique

pytestmark = pytest.mark.services
RULES = ROOT / "deploy" / "prometheus" / "rules"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
BUDGET = 'le="0.0005"'
ALERT = "TickserveLatencyBudgetBurnFast"


class Webhook:
    """An HTTP receiver that keeps every Alertmanager notification with its arrival time."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def first(self, alertname: str) -> tuple[float, dict[str, Any]] | None:
        for at, doc in self.received:
            if doc["status"] == "firing" and doc["commonLabels"].get("alertname") == alertname:
                return at, doc
        return None


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(f"{names[0]} not found: apt-get install -y prometheus-alertmanager")


def _wait_http(url: str, seconds: float, worker: Worker | None = None) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 (loopback)
                return
        except OSError:
            if worker is not None:
                assert worker.proc.poll() is None, f"worker exited: {worker.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.2)


def _alertmanager_config(webhook: str) -> dict[str, Any]:
    """The shipped config, its routes and timings kept, each receiver's target the webhook."""
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        receiver.pop("pagerduty_configs")
        receiver["webhook_configs"] = [{"url": webhook, "send_resolved": False}]
    return config  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Monitoring:
    """What the `monitoring` fixture runs: the worker's pipeline, the webhook, Prometheus."""

    pipeline: Pipeline
    webhook: Webhook
    prometheus: str


@pytest.fixture(scope="module")
def monitoring(
    tmp_path_factory: pytest.TempPathFactory, pipeline: Pipeline
) -> Iterator[Monitoring]:
    """Worker, Prometheus and Alertmanager running."""
    tmp_path = tmp_path_factory.mktemp("monitoring")
    # topics of its own: ticks published into the session's ticks topic reach every later
    # worker on it (tests/test_pipeline.py counted them as ticks sent twice)
    settings = fresh(
        pipeline.settings,
        http_port=free_port(),
        http_host="127.0.0.1",
        summary_topic=unique("summary"),
    )
    webhook = Webhook()
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in RULES.glob("*.rules.yml"):
        (rules / path.name).write_text(path.read_text().replace('le="0.025"', BUDGET))
    am_port, prom_port = free_port(), free_port()
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(_alertmanager_config(webhook.url)))
    prometheus_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules / "*.rules.yml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "tickserve-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{settings.http_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
    logs = (tmp_path / "alertmanager.log").open("w"), (tmp_path / "prometheus.log").open("w")
    procs = [
        subprocess.Popen(
            [
                _binary("prometheus-alertmanager", "alertmanager"),
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                _binary("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
    ]
    run(publish(pipeline.ticks[:HISTORY], settings.bootstrap, settings.ticks_topic))
    # `tickserve serve` in a process of its own, as Prometheus scrapes it in production: in
    # the test process its metrics would hold every earlier in-process worker's counts (in
    # the full suite of 2026-12-04 the burn never showed: the scraped counts were other
    # workers', and did not move)
    worker = Worker(settings, tmp_path / "worker.log", http=True)
    try:
        _wait_http(f"http://127.0.0.1:{am_port}/-/ready", 30)
        _wait_http(f"http://127.0.0.1:{prom_port}/-/ready", 30)
        _wait_http(f"http://127.0.0.1:{settings.http_port}/metrics", 180, worker)
        served = Pipeline(settings, pipeline.result, pipeline.ticks)
        yield Monitoring(served, webhook, f"http://127.0.0.1:{prom_port}")
    finally:
        # Prometheus and Alertmanager go even when the worker does not stop in time
        try:
            worker.stop()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            for log in logs:
                log.close()
            webhook.server.shutdown()


def test_a_latency_burn_pages_through_alertmanager(
    monitoring: Monitoring, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline, webhook = monitoring.pipeline, monitoring.webhook
    settings = pipeline.settings
    assert webhook.first(ALERT) is None
    breach = time.monotonic()
    run(publish(pipeline.ticks[HISTORY:], settings.bootstrap, settings.ticks_topic))

    deadline = breach + 180
    while (found := webhook.first(ALERT)) is None:
        assert time.monotonic() < deadline, f"no page delivered: {webhook.received}"
        time.sleep(0.2)
    delivered, doc = found
    assert doc["receiver"] == "pagerduty-page"
    assert doc["commonLabels"]["severity"] == "page"
    assert doc["commonLabels"]["slo"] == "latency"
    assert "docs/operations.md#" in doc["commonAnnotations"]["runbook"]
    with capsys.disabled():
        print(f"\nlatency burn: breach -> page delivered in {delivered - breach:.1f} s")


# Dashboard metrics that the worker on this branch does not export yet (the metrics and monitor
# work adds them); the test fails when this list is out of date, either way.
NOT_YET: set[str] = set()  # every metric the dashboards use is exported
# exported by `tickserve monitor`, which this test does not run
MONITOR = {"model_directional_accuracy", "feature_psi"}
# counters of events that did not happen here (a model swap or refusal): no series until then
EVENTS = {"Swaps and rejections"}


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())["data"]["result"]  # type: ignore[no-any-return]


def test_dashboard_panels_return_data(monitoring: Monitoring) -> None:
    settings = monitoring.pipeline.settings
    url = monitoring.prometheus
    run(publish(monitoring.pipeline.ticks[-500:], settings.bootstrap, settings.ticks_topic))
    run(_publish_bad(settings.bootstrap, settings.ticks_topic))
    deadline = time.monotonic() + 120
    # the counter's series is born at 1: its value, not its increase, shows the dead letter
    while not _query(url, "sum(dead_letters_total) > 0"):
        assert time.monotonic() < deadline, "the dead letter never reached Prometheus"
        time.sleep(1)
    time.sleep(3)  # a few more scrapes for the rates

    exported = {
        series["metric"]["__name__"]
        for series in _query(url, 'count by (__name__) ({job="tickserve-worker"})')
    }
    dashboard = json.loads((DASHBOARD).read_text())
    named = {name for panel in dashboard["panels"] for name in _panel_metrics(panel)}
    assert named & NOT_YET == NOT_YET, "NOT_YET names metrics the dashboard does not use"
    assert NOT_YET.isdisjoint(exported), "a NOT_YET metric is exported now: update NOT_YET"

    empty = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row" or panel["title"] in EVENTS:
            continue
        if _panel_metrics(panel) & (NOT_YET | MONITOR):
            continue
        if not any(_query(url, target["expr"]) for target in panel["targets"]):
            empty.append(panel["title"])
    assert empty == []


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tickserve.json"


def _panel_metrics(panel: dict[str, Any]) -> set[str]:
    text = " ".join(target["expr"] for target in panel.get("targets", []))
    return {name for name in NOT_YET | MONITOR if name in text}


async def _publish_bad(bootstrap: str, topic: str) -> None:
    from stream.kafka.clients import make_producer

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"not a tick", key=b"XRP/ETH")
    finally:
        await producer.stop()
