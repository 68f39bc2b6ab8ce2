"""Structured JSON logging for every tickserve process, libraries' loggers included."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

from tickserve.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries that install handlers of their own (mlflow on import, alembic through
# mlflow's migrations, faust/mode when a worker starts): their records are sent to the
# root handler instead, so every line on stderr is one JSON object.
ADOPTED = ("mlflow", "alembic", "sqlalchemy", "huey", "feast", "faust", "mode", "uvicorn")
QUIET = ("aiokafka", "kafka", "feast", "mlflow", "alembic", "urllib3", "numba")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields.

    Inside an OpenTelemetry span, the line carries its `trace_id` and `span_id` (hex,
    as trace backends show them).
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a single JSON line."""
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            doc["trace_id"] = format(context.trace_id, "032x")
            doc["span_id"] = format(context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def adopt_library_loggers(names: tuple[str, ...] = ADOPTED) -> None:
    """Remove the handlers `names` installed themselves; their records reach the root's.

    Call again after importing a library that configures logging on import (mlflow
    does unless MLFLOW_CONFIGURE_LOGGING=false, which `deploy` sets).
    """
    for name in names:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True


def setup_logging(level: str = "INFO") -> None:
    """Send all logs and warnings to stderr as JSON lines; quiet the chattiest libraries.

    Raises:
        ConfigError: `level` is not one of `LOG_LEVELS`.
    """
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"bad log level {level!r}: one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a JSON line too (py.warnings)
    adopt_library_loggers()
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
