"""deploy/compose.yaml: valid against the compose specification's JSON schema, and consistent.

The schema is compose-spec/compose-spec's schema/compose-spec.json as the PyPI package
check-jsonschema vendors it (tests/published.py downloads the wheel once into a cache).
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from deploy.settings import Settings
from tests.helpers import ROOT
from tests.published import Unavailable, compose_spec_schema

DEPLOY = ROOT / "deploy"
SERVICES = {
    "kafka",
    "redis",
    "clickhouse",
    "postgres",
    "minio",
    "mlflow",
    "prometheus",
    "alertmanager",
    "grafana",
    "worker",
    "monitor",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    try:
        schema = compose_spec_schema()
    except Unavailable as exc:  # the only skip: no registry to download the schema from
        pytest.skip(str(exc))
    assert schema["title"] == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)  # the draft its $schema names
    cls.check_schema(schema)
    return cls(schema, format_checker=jsonschema.FormatChecker())  # type: ignore[no-any-return]


def test_compose_file_follows_the_specification(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_rejects_a_bad_file(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    bad = {**compose, "services": {**compose["services"], "redis": {"image": 7, "restart": []}}}
    assert list(validator.iter_errors(bad))


def test_every_part_of_the_system_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= SERVICES
    kafka = compose["services"]["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), name


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


def test_prometheus_scrapes_the_compose_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    for target in targets:
        assert target.split(":")[0] in compose["services"], target


def test_tickserve_variables_are_settings(compose: dict[str, Any]) -> None:
    fields = Settings.model_fields
    names = {f"TICKSERVE_{name.upper()}" for name in fields} | {
        str(field.validation_alias) for field in fields.values() if field.validation_alias
    }
    for service in ("worker", "monitor"):
        env = compose["services"][service]["environment"]
        assert env["TICKSERVE_HTTP_HOST"] == "0.0.0.0"
        for name in env:
            if name.startswith(("TICKSERVE_", "REDIS_", "MLFLOW_")):
                assert name in names, name
