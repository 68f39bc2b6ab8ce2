"""Prometheus rules and Alertmanager config: promtool/amtool accept them, every alert is tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.rules.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: apt-get install -y prometheus prometheus-alertmanager"
    return path


def _run(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def _alerts() -> list[dict[str, object]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_promtool_checks_the_rules() -> None:
    out = _run(_tool("promtool"), "check", "rules", *map(str, RULES))
    assert out.count("SUCCESS") == len(RULES)


def test_promtool_unit_tests_pass() -> None:
    out = _run(
        _tool("promtool"), "test", "rules", *(p.name for p in RULE_TESTS), cwd=RULE_TESTS[0].parent
    )
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in _alerts()}
    assert names - firing == set()
    assert names - silent == set()


def test_every_alert_has_a_severity_and_a_runbook() -> None:
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]  # type: ignore[index]
        assert "docs/operations.md#" in rule["annotations"]["runbook"], rule["alert"]  # type: ignore[index]


def test_runbook_anchors_exist_in_the_operations_doc() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        line.lstrip("#").strip().lower().replace(" ", "-")
        for line in doc.splitlines()
        if line.startswith("#")
    }
    for rule in _alerts():
        anchor = str(rule["annotations"]["runbook"]).split("#")[-1].rstrip(".")  # type: ignore[index]
        assert anchor in anchors, (rule["alert"], anchor)


def test_prometheus_config_loads_the_rules(tmp_path: Path) -> None:
    config = (PROMETHEUS / "prometheus.yml").read_text()
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/rules", str(PROMETHEUS / "rules")))
    out = _run(_tool("promtool"), "check", "config", str(local))
    assert f"SUCCESS: {len(RULES)} rule files found" in out


def test_amtool_accepts_the_alertmanager_config() -> None:
    out = _run(_tool("amtool"), "check-config", str(ALERTMANAGER))
    assert "SUCCESS" in out


def test_routing_by_severity() -> None:
    amtool = _tool("amtool")
    route = ["config", "routes", "test", f"--config.file={ALERTMANAGER}"]
    assert _run(amtool, *route, "severity=page").split()[0] == "pagerduty-page"
    assert _run(amtool, *route, "severity=ticket").split()[0] == "pagerduty-ticket"


def test_pagerduty_key_comes_from_a_file() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        for pd in receiver["pagerduty_configs"]:
            assert "routing_key" not in pd
            assert pd["routing_key_file"].startswith("/etc/alertmanager/secrets/")
