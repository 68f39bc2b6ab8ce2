"""Settings read once from the environment (TICKSERVE_*), validated, then passed down frozen."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.spec import NS_PER_SECOND, FeatureSpec
from tickserve.errors import ConfigError


class Settings(BaseSettings):
    """Every knob of a tickserve process; see README 'Configuration'."""

    model_config = SettingsConfigDict(
        env_prefix="TICKSERVE_", frozen=True, extra="ignore", populate_by_name=True
    )  # populate_by_name: keyword overrides by field name (redis_url=None) as well

    state_dir: Path = Path(".tickserve")

    # Kafka
    broker_port: int = Field(19092, ge=1, le=65535)
    bootstrap_servers: str | None = None
    ticks_topic: str = "ticks"
    signals_topic: str = "signals"
    dlq_topic: str = "ticks.dlq"
    partitions: int = Field(4, ge=1)
    group_id: str = "tickserve-worker"
    archive_group_id: str = "tickserve-archive"
    # Tansu stalls short fetch waits (shared/BROKER.md): keep >= 20 ms.
    fetch_max_wait_ms: int = Field(20, ge=1)
    linger_ms: int = Field(5, ge=0)
    max_batch: int = Field(2000, ge=1)
    snapshot_interval_s: float = Field(10.0, gt=0)
    # The Feast writer flushes the newest row per symbol this often. Its CPU scales with
    # symbols x flushes (~50 us per row inside Feast), not with ticks: 0.25 s keeps it
    # near 2% of a core at 100 symbols, and Redis at most ~0.3 s behind the stream
    online_flush_s: float = Field(0.25, gt=0)
    # acknowledged offsets are committed at most this often, always on revoke and stop
    commit_interval_ms: int = Field(100, ge=0)
    # ticks and signals over stream.kafka.wire's own Fetch/Produce connections (plaintext);
    # false: aiokafka's data path
    wire: bool = True
    # one TCP write per micro-batch: the next Fetch leaves with the signals' Produce
    # (~0.5 us/tick less worker CPU at 20k ticks/s; false: the Fetch leaves as soon as
    # the last response is in, before the micro-batch is worked, in its own write)
    one_write: bool = True

    # Redis / Feast. REDIS_URL and MLFLOW_TRACKING_URI are read without the TICKSERVE_
    # prefix: the names these tools' users already set (MLflow's own CLI reads the latter)
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    valkey_port: int = Field(16379, ge=1, le=65535)

    # MLflow
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    model_name: str = "tickserve-crypto"
    model_alias: str = "champion"
    prefer_gpu: bool = True
    tensorrt: bool = False  # TensorRT before CUDA where its library loads (engine builds take s)
    onnx_threads: int = Field(1, ge=1)  # ONNX Runtime intra-op threads per session
    # the Numba kernels (inference/trees.py, linear.py) score the models they cover
    numba_kernels: bool = True

    # ClickHouse
    clickhouse_dsn: str | None = None

    # Features
    bar_seconds: float = Field(60.0, gt=0)
    max_symbols: int = Field(10_000, ge=1)
    max_future_ms: int = Field(5_000, ge=0)

    # Serving
    # HTTP API, probes and /metrics on the worker's event loop; 0 disables it
    http_port: int = Field(8000, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    max_delay_us: int = Field(500, ge=0)  # a queued (HTTP) row waits at most this long
    stale_ms: int = Field(0, ge=0)  # rows older than this (since recv_ns) are dropped; 0 = never
    model_poll_s: float = Field(5.0, gt=0)  # registry poll interval for alias changes
    challenger_alias: str = ""  # scored in shadow to shadow_topic; "" = no challenger
    shadow_topic: str = "signals.shadow"
    warmup_budget_ms: int = Field(2000, gt=0)
    # How long a background thread (Feast writer, registry polls, model loads) may hold
    # the GIL before the event loop gets it back; Python's default is 5000 us, which
    # shows up as multi-ms stalls in the stream and in swap pauses
    gil_switch_interval_us: int = Field(500, ge=50, le=100_000)
    # SCHED_FIFO priority of the thread that runs the stream (0: the normal scheduler).
    # On a shared machine the kernel's fair scheduler preempts a micro-batch for the
    # broker or other processes; a real-time priority keeps them from it. Needs
    # CAP_SYS_NICE (root, or the capability in the pod's securityContext).
    realtime_priority: int = Field(0, ge=0, le=99)
    # Time slice asked of the fair scheduler for the stream thread, in us (0: the
    # kernel's default). On Linux 6.12+ a short slice lets the thread preempt a busy
    # neighbour as soon as its fetch arrives, without privileges (see tickserve.sched).
    sched_slice_us: int = Field(0, ge=0, le=100_000)
    # HMAC secret of the MLflow webhook (POST /webhooks/mlflow); unset or "" = refused (403)
    webhook_secret: SecretStr | None = None
    log_level: str = "INFO"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError(f"must start with redis:// or rediss://, got {value!r}")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers: explicit, else the local broker."""
        return self.bootstrap_servers or f"127.0.0.1:{self.broker_port}"

    @property
    def redis(self) -> str:
        """Redis URL: REDIS_URL if set, else the local Valkey."""
        return self.redis_url or f"redis://127.0.0.1:{self.valkey_port}/0"

    @property
    def mlflow_uri(self) -> str:
        """MLflow tracking URI: MLFLOW_TRACKING_URI if set, else sqlite in the state dir."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.state_dir.resolve()}/mlflow.db"

    @property
    def clickhouse(self) -> str:
        """ClickHouse DSN: a server URL, else the embedded engine in the state dir."""
        return self.clickhouse_dsn or f"chdb:///{self.state_dir.resolve()}/clickhouse"

    @property
    def feast_registry(self) -> Path:
        """Feast registry file (the online store itself is Redis)."""
        return self.state_dir.resolve() / "feast" / "registry.db"

    @property
    def feature_spec(self) -> FeatureSpec:
        """The FeatureSpec this configuration computes."""
        return FeatureSpec(bar_ns=int(self.bar_seconds * NS_PER_SECOND))


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise ConfigError with one readable line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        if where in Settings.model_fields:  # name the variable the user sets
            where = f"TICKSERVE_{where.upper()}"
        raise ConfigError(f"bad setting {where}: {first['msg']}") from None
