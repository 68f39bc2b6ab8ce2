"""Settings read once from the environment (TICKSERVE_*), validated, then passed down frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.spec import NS_PER_SECOND, FeatureSpec
from stream.kafka.security import KafkaSecurity
from tickserve.errors import ConfigError
from tickserve.logs import LOG_LEVELS


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
    stall_after_s: float = Field(
        30.0,
        gt=0,
        description='/ready turns false (reason "stalled ...") once the worker\'s positions '
        "have not moved for this long while its partitions lag",
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
        "(TLS and SASL as below); false: aiokafka's data path",
    )
    exactly_once: bool = Field(
        False,
        description="Each commit is a Kafka transaction holding the signals, dead letters "
        "and input offsets since the last (librdkafka's client; read the signals with "
        "isolation.level=read_committed); needs a broker with transactions; "
        "TICKSERVE_WIRE does not apply",
    )
    transactional_id: str | None = Field(
        None,
        description="Transactional id of a worker with TICKSERVE_EXACTLY_ONCE; unset: "
        "`<group_id>-<host name>` (keep it stable across restarts of one instance)",
    )

    # Kafka security: one set for every client (worker, feed, archiver, bench)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client connects (Kafka's security.protocol)"
    )
    kafka_ssl_ca_file: Path | None = Field(
        None,
        description="PEM file of the CAs that sign the brokers' certificates; unset: the "
        "system's trust store",
    )
    kafka_ssl_cert_file: Path | None = Field(
        None, description="Client certificate (PEM) for mutual TLS; may hold the key too"
    )
    kafka_ssl_key_file: Path | None = Field(
        None, description="Private key (PEM, unencrypted) of the client certificate"
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="The broker's certificate must name the host dialled"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; required with SASL_PLAINTEXT and SASL_SSL"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL username")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password; or TICKSERVE_KAFKA_SASL_PASSWORD_FILE, not both"
    )
    kafka_sasl_password_file: Path | None = Field(
        None,
        description="File holding the SASL password (a mounted Kubernetes secret); "
        "surrounding whitespace is stripped",
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
        10_000,
        ge=1,
        description="Symbols a worker keeps feature state for; ticks of further symbols go "
        "to the dead-letter topic with reason `capacity`",
    )
    max_future_ms: int = Field(
        5_000,
        ge=0,
        description="Tolerated clock skew: a tick whose event time is further ahead is "
        "dead-lettered (reason future)",
    )

    # Serving
    # HTTP API, probes and /metrics on a thread and event loop of their own; 0 disables it
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
    max_non_finite_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="A champion whose share of NaN/infinite scores passes this (over 1,000 "
        "rows or more) is rolled back to the version it replaced",
    )
    challenger_alias: str = Field(
        "", description="Alias scored in shadow to shadow_topic, never to signals; empty: none"
    )
    shadow_topic: str = Field("signals.shadow", description="Topic of the challenger's scores")
    max_model_mb: int = Field(
        512,
        gt=0,
        description="A version whose ONNX file is larger (MiB) is refused (reason `size`) "
        "before it is downloaded, so it is never loaded beside the serving version",
    )
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
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token that POST /predict and GET /model require; unset (and no "
        "api_token_file): they are open",
    )
    api_token_file: Path | None = Field(
        None, description="File holding the bearer token (a mounted secret); instead of api_token"
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="HTTP request bodies larger than this get 413 unread"
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve /metrics on this port of http_host, on a thread of its own, instead "
        "of the API's port; 0: on the API's port",
    )
    trace_sample_rate: float = Field(
        0.001,
        ge=0.0,
        le=1.0,
        description="Fraction of ticks the feed traces (W3C `traceparent` header); traces "
        "are exported only where OTEL_EXPORTER_OTLP_ENDPOINT (or _TRACES_ENDPOINT) is set",
    )
    trace_max_per_second: float = Field(
        2.0,
        ge=0.0,
        description="At most this many ticks a second traced by one feed (a token bucket "
        "over the sampled ones), so that tracing's cost does not grow with the tick rate; "
        "0: no cap",
    )
    log_level: str = Field(
        "INFO",
        description="Level of the JSON log lines on stderr: DEBUG, INFO, WARNING, ERROR or "
        "CRITICAL",
    )
    metrics_symbols: str = Field(
        "",
        description="Comma-separated symbols that keep their own `symbol` label on "
        "predictions_total (every other symbol counts as `other`); empty: the first 20 "
        "symbols the worker sees",
    )
    git_commit: str = Field(
        "",
        description="Git commit shown by tickserve_build_info; empty: `git rev-parse HEAD` "
        "of the working directory, else `unknown`",
    )

    # Live model quality (`tickserve monitor`)
    summary_topic: str = Field(
        "signals.summary",
        description="Topic of the workers' summaries (prices, calls, features) "
        "that `tickserve monitor` judges; empty: not published",
    )
    monitor_http_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="/metrics of `tickserve monitor` (model_directional_accuracy, "
        "feature_psi); 0: `tickserve up` does not start the monitor",
    )
    monitor_app_id: str = Field(
        "tickserve-monitor",
        description="faust app id of the monitor: its consumer group and the prefix of its "
        "changelog topics (where its figures survive restarts)",
    )
    monitor_rollup_s: float = Field(
        60.0, gt=0, description="How often the monitor writes its figures to ClickHouse"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError(f"must start with redis:// or rediss://, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.upper()

    @field_validator("webhook_secret", "api_token")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def bearer_token(self) -> SecretStr | None:
        """The API's bearer token: api_token, else the contents of api_token_file.

        Raises:
            ConfigError: The token file cannot be read or is empty.
        """
        return _secret(self.api_token, self.api_token_file, "TICKSERVE_API_TOKEN_FILE")

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        problem = _security_problem(self)
        if problem:
            raise PydanticCustomError("kafka_security", problem)
        return self

    @property
    def kafka_security(self) -> KafkaSecurity:
        """TLS and SASL of every Kafka client (reads the password file, if one is set).

        Raises:
            ConfigError: The password file cannot be read.
        """
        password = _secret(
            self.kafka_sasl_password,
            self.kafka_sasl_password_file,
            "TICKSERVE_KAFKA_SASL_PASSWORD_FILE",
        )
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            ca_file=self.kafka_ssl_ca_file,
            cert_file=self.kafka_ssl_cert_file,
            key_file=self.kafka_ssl_key_file,
            check_hostname=self.kafka_ssl_check_hostname,
            sasl_mechanism=self.kafka_sasl_mechanism or "PLAIN",
            username=self.kafka_sasl_username or "",
            password=password,
        )

    @property
    def metrics_symbol_list(self) -> tuple[str, ...]:
        """`metrics_symbols` split at commas, blanks dropped."""
        return tuple(s.strip() for s in self.metrics_symbols.split(",") if s.strip())

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
    def monitor_clickhouse(self) -> str:
        """ClickHouse DSN of the monitor's rollups: the server, else its own embedded path.

        The embedded engine allows one process per data path, and the monitor is a
        process of its own.
        """
        return self.clickhouse_dsn or f"chdb:///{self.state_dir.resolve()}/clickhouse-monitor"

    @property
    def feast_registry(self) -> Path:
        """Feast registry file (the online store itself is Redis)."""
        return self.state_dir.resolve() / "feast" / "registry.db"

    @property
    def feature_spec(self) -> FeatureSpec:
        """The FeatureSpec this configuration computes."""
        return FeatureSpec(bar_ns=int(self.bar_seconds * NS_PER_SECOND))


def _secret(value: SecretStr | None, path: Path | None, name: str) -> SecretStr | None:
    """A secret given directly, else the stripped contents of the file at `path` (a mount).

    Raises:
        ConfigError: The file cannot be read or holds nothing; the message names `name`.
    """
    if value is not None or path is None:
        return value
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"bad setting {name}: {exc.strerror} ({path})") from None
    if not text:
        raise ConfigError(f"bad setting {name}: {path} is empty")
    return SecretStr(text)


def _security_problem(s: Settings) -> str:
    """What is wrong with the Kafka security settings taken together ('' if nothing)."""
    protocol = s.kafka_security_protocol
    tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
    tls_files = [
        ("KAFKA_SSL_CA_FILE", s.kafka_ssl_ca_file),
        ("KAFKA_SSL_CERT_FILE", s.kafka_ssl_cert_file),
        ("KAFKA_SSL_KEY_FILE", s.kafka_ssl_key_file),
    ]
    set_tls = [name for name, value in tls_files if value is not None]
    set_sasl = [
        name
        for name, value in [
            ("KAFKA_SASL_MECHANISM", s.kafka_sasl_mechanism),
            ("KAFKA_SASL_USERNAME", s.kafka_sasl_username),
            ("KAFKA_SASL_PASSWORD", s.kafka_sasl_password),
            ("KAFKA_SASL_PASSWORD_FILE", s.kafka_sasl_password_file),
        ]
        if value is not None
    ]
    where = f"with TICKSERVE_KAFKA_SECURITY_PROTOCOL={protocol}"
    if set_tls and not tls:
        return f"TICKSERVE_{set_tls[0]} is set {where}, which has no TLS (SSL or SASL_SSL?)"
    if set_sasl and not sasl:
        return f"TICKSERVE_{set_sasl[0]} is set {where}, which has no SASL"
    if s.kafka_ssl_key_file is not None and s.kafka_ssl_cert_file is None:
        return "TICKSERVE_KAFKA_SSL_KEY_FILE is set without TICKSERVE_KAFKA_SSL_CERT_FILE"
    for name, path in tls_files:
        if path is not None and not path.is_file():
            return f"TICKSERVE_{name} is not a file: {path}"
    if not sasl:
        return ""
    if s.kafka_sasl_mechanism is None:
        return f"TICKSERVE_KAFKA_SASL_MECHANISM is required {where}"
    if not s.kafka_sasl_username:
        return f"TICKSERVE_KAFKA_SASL_USERNAME is required {where}"
    if (s.kafka_sasl_password is None) == (s.kafka_sasl_password_file is None):
        return (
            "set exactly one of TICKSERVE_KAFKA_SASL_PASSWORD and "
            f"TICKSERVE_KAFKA_SASL_PASSWORD_FILE {where}"
        )
    if s.kafka_sasl_password_file is not None and not s.kafka_sasl_password_file.is_file():
        return f"TICKSERVE_KAFKA_SASL_PASSWORD_FILE is not a file: {s.kafka_sasl_password_file}"
    return ""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise ConfigError with one readable line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if not where:  # a check of several settings together: its message names them
            raise ConfigError(f"bad settings: {first['msg']}") from None
        if where in Settings.model_fields:  # name the variable the user sets
            where = f"TICKSERVE_{where.upper()}"
        raise ConfigError(f"bad setting {where}: {first['msg']}") from None
