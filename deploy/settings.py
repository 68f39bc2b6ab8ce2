"""Settings read once from the environment (TICKSERVE_*), validated, then passed down frozen."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.spec import NS_PER_SECOND, FeatureSpec
from tickserve.errors import ConfigError


class Settings(BaseSettings):
    """Every knob of a tickserve process; docs/configuration.md lists them (generated)."""

    model_config = SettingsConfigDict(
        env_prefix="TICKSERVE_", frozen=True, extra="ignore", populate_by_name=True
    )  # populate_by_name: keyword overrides by field name (redis_url=None) as well

    state_dir: Path = Field(
        Path(".tickserve"),
        description="Where the local stack keeps pids, logs and data (MLflow db, ClickHouse, "
        "Feast registry)",
    )

    # Kafka
    broker_port: int = Field(
        19092, ge=1, le=65535, description="Port of the local broker that `tickserve up` starts"
    )
    bootstrap_servers: str | None = Field(
        None,
        description="Kafka bootstrap servers, host:port[,host:port]; unset: the local broker "
        "on `127.0.0.1:<broker_port>`",
    )
    ticks_topic: str = Field(
        "ticks", description="Topic of the ticks (key: symbol, value: tick JSON)"
    )
    signals_topic: str = Field("signals", description="Topic of the signals, one per valid tick")
    dlq_topic: str = Field(
        "ticks.dlq",
        description="Dead-letter topic: records that fail the tick contract, with headers "
        "reason, detail and source",
    )
    partitions: int = Field(
        4, ge=1, description="Partitions of the topics tickserve creates when they are missing"
    )
    group_id: str = Field("tickserve-worker", description="Consumer group of the stream workers")
    archive_group_id: str = Field(
        "tickserve-archive", description="Consumer group of `tickserve archive`"
    )
    fetch_max_wait_ms: int = Field(
        20,
        ge=1,
        description="How long the broker may hold a Fetch for data; keep >= 20 with the "
        "local broker (Tansu stalls shorter waits, shared/BROKER.md)",
    )
    linger_ms: int = Field(
        5, ge=0, description="Producer linger of the feed and of the worker's aiokafka producer"
    )
    max_batch: int = Field(
        2000,
        ge=1,
        description="Most records per micro-batch and rows per model call (also the warm-up "
        "batch of a new version)",
    )
    snapshot_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often each partition's feature state is snapshotted to Redis (also "
        "on revoke and shutdown)",
    )
    online_flush_s: float = Field(
        0.25,
        gt=0,
        description="How often the online-store writer writes the newest row per symbol; its "
        "CPU grows with symbols x flushes, not with ticks",
    )
    commit_interval_ms: int = Field(
        100,
        ge=0,
        description="Acknowledged offsets are committed at most this often (always on revoke "
        "and stop)",
    )
    wire: bool = Field(
        True,
        description="Ticks and signals over tickserve's own Fetch/Produce connections "
        "(plaintext); false: aiokafka's data path",
    )

    # Redis / Feast
    # REDIS_URL and MLFLOW_TRACKING_URI are read without the TICKSERVE_ prefix: the
    # names these tools' users already set (MLflow's own CLI reads the latter)
    redis_url: str | None = Field(
        None,
        validation_alias="REDIS_URL",
        description="Redis of the online store and the snapshots (redis:// or rediss://); "
        "unset: the local Valkey on `127.0.0.1:<valkey_port>`",
    )
    valkey_port: int = Field(
        16379, ge=1, le=65535, description="Port of the local Valkey that `tickserve up` starts"
    )

    # MLflow
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking and registry URI; unset: `sqlite:///<state_dir>/mlflow.db`",
    )
    model_name: str = Field("tickserve-crypto", description="Registered model name")
    model_alias: str = Field(
        "champion", description="Alias whose version scores the signals (move it to roll back)"
    )
    prefer_gpu: bool = Field(
        True, description="CUDA where its libraries load; otherwise CPU, quietly"
    )
    tensorrt: bool = Field(
        False,
        description="TensorRT before CUDA where its library loads (engine builds take seconds)",
    )
    cuda_graphs: bool = Field(
        True,
        description="On a GPU, score through CUDA graphs, one per power-of-two batch size "
        "(standard-operator models only); false: one CUDA session with I/O binding",
    )
    onnx_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per session")
    numba_kernels: bool = Field(
        True,
        description="The Numba kernels (inference/trees.py, linear.py) score the models they "
        "cover, each checked against ONNX Runtime first; false: ONNX Runtime scores all",
    )

    # ClickHouse
    clickhouse_dsn: str | None = Field(
        None,
        description="ClickHouse archive, a clickhouse-connect DSN such as "
        "`http://user:password@host:8123/db`; unset: the embedded engine in "
        "`<state_dir>/clickhouse`",
    )

    # Features
    bar_seconds: float = Field(
        60.0,
        gt=0,
        description="Length of the feature bars; part of the FeatureSpec hash, so a model "
        "trained with another length is refused",
    )
    max_symbols: int = Field(
        10_000, ge=1, description="Symbols a worker keeps feature state for (preallocated)"
    )
    max_future_ms: int = Field(
        5_000,
        ge=0,
        description="Tolerated clock skew: a tick whose event time is further ahead is "
        "dead-lettered (reason future)",
    )

    # Serving
    # HTTP API, probes and /metrics on the worker's event loop; 0 disables it
    http_port: int = Field(8000, ge=0, le=65535)
    http_host: str = Field(
        "127.0.0.1",
        description="Address the HTTP API listens on (one the MLflow server can reach, for "
        "webhooks)",
    )
    max_delay_us: int = Field(
        500, ge=0, description="A queued (HTTP) row waits at most this long for its batch"
    )
    stale_ms: int = Field(
        0,
        ge=0,
        description="Rows older than this (since recv_ns) are dropped unscored and their "
        "ticks dead-lettered (reason stale); 0: never",
    )
    model_poll_s: float = Field(5.0, gt=0, description="Registry poll interval for alias changes")
    challenger_alias: str = Field(
        "", description="Alias scored in shadow to shadow_topic, never to signals; empty: none"
    )
    shadow_topic: str = Field("signals.shadow", description="Topic of the challenger's scores")
    warmup_budget_ms: int = Field(
        2000, gt=0, description="A new version's warm-up calls must finish within this"
    )
    # Python's default of 5000 us shows up as multi-ms stalls in the stream and in swaps
    gil_switch_interval_us: int = Field(
        500,
        ge=50,
        le=100_000,
        description="How long a background thread (online writer, registry polls, model "
        "loads) may hold the GIL before the event loop gets it back",
    )
    # On a shared machine the kernel's fair scheduler preempts a micro-batch for the
    # broker or other processes; a real-time priority keeps them from it.
    realtime_priority: int = Field(
        0,
        ge=0,
        le=99,
        description="SCHED_FIFO priority of the stream thread, 0: the normal scheduler; needs "
        "CAP_SYS_NICE (root, or the capability in the pod's securityContext)",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC secret of the MLflow webhook (POST /webhooks/mlflow); unset: every "
        "delivery is refused (403)",
    )
    log_level: str = Field("INFO", description="Level of the JSON log lines on stderr")

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
