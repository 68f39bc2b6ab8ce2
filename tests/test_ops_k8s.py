"""deploy/k8s: every overlay renders with kustomize and every object validates offline.

Core kinds are validated by kubernetes-validate (the API's published schemas, strict: unknown
fields fail); KEDA's ScaledObject and the Prometheus operator's ServiceMonitor and PrometheusRule
by the npm packages of kubernetes-models, validators compiled from their CRDs' openAPIV3Schema
(tests/published.py installs them once into a cache and runs them with node).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.k8s_rules import TARGET, render
from deploy.settings import Settings
from tests.helpers import ROOT
from tests.published import Unavailable, crd_errors

K8S = ROOT / "deploy" / "k8s"
VARIANTS = ["base", "overlays/dev", "overlays/prod", "hpa", "exactly-once"]
KUBERNETES = "1.30.0"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def _render(variant: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its kustomize) not found: apt-get install -y kubectl"
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / variant)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _crd_errors(objects: list[dict[str, Any]]) -> list[list[str]]:
    try:
        return crd_errors(objects)
    except Unavailable as exc:  # the only skip: no node/npm or no registry
        pytest.skip(f"core kinds checked; custom resources not: {exc}")


def _by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _worker(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The worker's Deployment, or its StatefulSet in the exactly-once variant."""
    kinds = ("Deployment", "StatefulSet")
    (found,) = [
        o for o in objects if o["kind"] in kinds and o["metadata"]["name"] == "tickserve-worker"
    ]
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {variant: _render(variant) for variant in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    custom = []
    for obj in rendered[variant]:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            custom.append(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    kinds = {o["kind"] for o in custom}
    assert "ServiceMonitor" in kinds and ("ScaledObject" in kinds) == (variant != "hpa")
    errors = _crd_errors(custom)
    assert {o["metadata"]["name"]: e for o, e in zip(custom, errors, strict=True) if e} == {}


def test_a_bad_object_fails_validation(rendered: dict[str, list[dict[str, Any]]]) -> None:
    worker = _by_kind(rendered["base"], "Deployment", "tickserve-worker")
    broken = {**worker, "spec": {**worker["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    scaled = _by_kind(rendered["base"], "ScaledObject", "tickserve-worker")
    monitor = next(o for o in rendered["base"] if o["kind"] == "ServiceMonitor")
    rule = next(o for o in rendered["base"] if o["kind"] == "PrometheusRule")
    bad = [
        {**scaled, "spec": {"triggers": "kafka"}},
        {**monitor, "spec": {**monitor["spec"], "endpoints": {"port": "http"}}},
        {**rule, "spec": {"groups": [{"rules": []}]}},  # a group needs its name
    ]
    errors = _crd_errors([scaled, monitor, rule, *bad])
    assert errors[:3] == [[], [], []]
    assert all(errors[3:]), errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_probes_resources_and_security(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    pod = _worker(rendered[variant])["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2000m", "memory": "4Gi"},
    }
    assert {"secretRef": {"name": "ml-secrets"}} in container["envFrom"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("variant", ["base", "overlays/dev", "overlays/prod", "exactly-once"])
def test_keda_never_scales_past_the_partitions(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    scaled = _by_kind(rendered[variant], "ScaledObject", "tickserve-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == Settings().group_id
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert scaled["spec"]["maxReplicaCount"] <= Settings().partitions


def test_hpa_variant_replaces_keda(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {o["kind"] for o in rendered["hpa"]}
    assert "ScaledObject" not in kinds
    hpa = _by_kind(rendered["hpa"], "HorizontalPodAutoscaler", "tickserve-worker")
    assert hpa["spec"]["maxReplicas"] <= Settings().partitions


def test_overlays_set_their_namespace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, namespace in [("overlays/dev", "tickserve-dev"), ("overlays/prod", "tickserve")]:
        assert {o["metadata"].get("namespace") for o in rendered[variant]} == {namespace}


def test_services_are_the_jobs_the_rules_select(rendered: dict[str, list[dict[str, Any]]]) -> None:
    services = {o["metadata"]["name"] for o in rendered["base"] if o["kind"] == "Service"}
    rules = TARGET.read_text()
    for job in ("tickserve-worker", "tickserve-monitor"):
        assert job in services and f'job="{job}"' in rules


def test_prometheusrule_is_generated_from_the_rule_files() -> None:
    assert TARGET.read_text() == render(), "stale: run python -m deploy.k8s_rules"


def test_cronjob_trains_weekly_and_gates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cron = _by_kind(rendered["overlays/prod"], "CronJob", "tickserve-weekly-train")
    assert cron["spec"]["schedule"] == "0 1 * * 0" and cron["spec"]["timeZone"] == "Etc/UTC"
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "tickserve validate --min-accuracy 0.54 --min-sharpe 1.0" in container["args"][0]


def test_exactly_once_variant_runs_the_worker_with_stable_transactional_ids(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """A StatefulSet (stable pod names, so stable ids) with the base Deployment's pod, plus env."""
    objects = rendered["exactly-once"]
    worker = _worker(objects)
    assert worker["kind"] == "StatefulSet"
    scaled = _by_kind(objects, "ScaledObject", "tickserve-worker")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "tickserve-worker",
    }
    pod = copy.deepcopy(worker["spec"]["template"])
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container.pop("env")}
    assert env["TICKSERVE_EXACTLY_ONCE"] == "true"
    assert env["TICKSERVE_TRANSACTIONAL_ID"] == "$(POD_NAMESPACE).$(POD_NAME)"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # the rest of the pod is the base Deployment's: the two cannot drift apart
    assert pod == _by_kind(rendered["base"], "Deployment", "tickserve-worker")["spec"]["template"]
