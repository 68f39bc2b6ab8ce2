"""Settings: one environment variable per setting, and a bad value named by that variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.compose import watcher_config
from deploy.settings import Settings, load_settings
from tickserve.errors import ConfigError


def test_each_setting_has_one_variable() -> None:
    several = {
        name: field.validation_alias
        for name, field in Settings.model_fields.items()
        if field.validation_alias is not None and not isinstance(field.validation_alias, str)
    }
    assert several == {}


def test_variables_set_their_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKSERVE_HTTP_PORT", "8123")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    settings = load_settings()
    assert settings.http_port == 8123
    assert settings.redis == "redis://cache:6379/1"
    assert settings.mlflow_uri == "http://mlflow:5000"


def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKSERVE_HTTP_PORT", "70000")
    with pytest.raises(ConfigError, match="^bad setting TICKSERVE_HTTP_PORT: "):
        load_settings()
    monkeypatch.delenv("TICKSERVE_HTTP_PORT")
    monkeypatch.setenv("REDIS_URL", "http://nowhere")
    with pytest.raises(ConfigError, match="^bad setting REDIS_URL: "):
        load_settings()


def test_the_model_size_limit_reaches_the_watcher_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watcher_config(load_settings()).max_model_bytes == 512 * 2**20
    monkeypatch.setenv("TICKSERVE_MAX_MODEL_MB", "16")
    assert watcher_config(load_settings()).max_model_bytes == 16 * 2**20
    monkeypatch.setenv("TICKSERVE_MAX_MODEL_MB", "0")
    with pytest.raises(ConfigError, match="^bad setting TICKSERVE_MAX_MODEL_MB: "):
        load_settings()


def test_the_api_token_comes_from_the_environment_or_a_mounted_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv("TICKSERVE_API_TOKEN_FILE", str(secret))
    token = load_settings().bearer_token
    assert token is not None and token.get_secret_value() == "from-file"
    assert "from-file" not in repr(load_settings())
    monkeypatch.setenv("TICKSERVE_API_TOKEN", "from-env")
    token = load_settings().bearer_token
    assert token is not None and token.get_secret_value() == "from-env"
    monkeypatch.delenv("TICKSERVE_API_TOKEN")
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="bad setting TICKSERVE_API_TOKEN_FILE: .* is empty"):
        _ = load_settings().bearer_token
    secret.unlink()
    with pytest.raises(ConfigError, match="bad setting TICKSERVE_API_TOKEN_FILE: No such file"):
        _ = load_settings().bearer_token
