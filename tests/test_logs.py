"""JSON log lines: trace context, libraries' loggers in the same format, a bad level."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider

from tests.helpers import ROOT, error_lines, tickserve
from tickserve.errors import ConfigError
from tickserve.logs import JsonFormatter, setup_logging


def _line(message: str) -> dict[str, object]:
    record = logging.LogRecord("tickserve.test", logging.INFO, __file__, 1, message, None, None)
    record.topic = "ticks"
    return orjson.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_a_line_carries_the_active_span_ids_and_none_outside_a_span() -> None:
    outside = _line("no span")
    assert "trace_id" not in outside and "span_id" not in outside
    tracer = TracerProvider().get_tracer("test")  # not installed globally
    with tracer.start_as_current_span("batch") as span:
        inside = _line("in a span")
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert (inside["msg"], inside["topic"], inside["level"]) == ("in a span", "ticks", "info")


def test_mlflow_alembic_and_warnings_log_through_the_json_handler() -> None:
    """mlflow installs its own handler on import unless `deploy` tells it not to."""
    code = (
        "import logging; from deploy.cli import route_library_logs; "
        "from tickserve.logs import setup_logging; route_library_logs(); setup_logging(); "
        "import mlflow; "
        "logging.getLogger('mlflow.store').warning('from mlflow'); "
        "logging.getLogger('alembic.runtime').warning('from alembic'); "
        "import warnings; warnings.warn('from a library', DeprecationWarning, stacklevel=1)"
    )
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, timeout=120, check=True, cwd=ROOT)  # fmt: skip
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # each one JSON
    assert {(d["logger"], d["msg"]) for d in lines} >= {
        ("mlflow.store", "from mlflow"),
        ("alembic.runtime", "from alembic"),
    }
    assert any(d["logger"] == "py.warnings" and "from a library" in d["msg"] for d in lines)


def test_a_bad_log_level_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = tickserve("serve", env={"TICKSERVE_LOG_LEVEL": "NOPE"}, cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.splitlines()
        == error_lines(done)
        == [
            "tickserve serve: error: bad setting TICKSERVE_LOG_LEVEL: Value error, must be one of "
            "DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'NOPE'"
        ]
    )
    with pytest.raises(ConfigError, match="bad log level 'NOPE'"):
        setup_logging("NOPE")
