"""The command line: --help everywhere, and config errors as one clear line (exit status 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.cli import COMMANDS
from tests.helpers import ROOT, error_lines, tickserve


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, tmp_path: Path) -> None:
    done = tickserve(command, "--help", env={}, cwd=tmp_path)
    assert done.returncode == 0
    assert "usage: tickserve" in done.stdout


def test_bad_setting_is_one_line(tmp_path: Path) -> None:
    done = tickserve("serve", env={"REDIS_URL": "http://nowhere"}, cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done) == [
        "tickserve serve: error: bad setting REDIS_URL: Value error, "
        "must start with redis:// or rediss://, got 'http://nowhere'"
    ]


def test_realtime_priority_out_of_range_is_one_line(tmp_path: Path) -> None:
    done = tickserve("serve", env={"TICKSERVE_REALTIME_PRIORITY": "100"}, cwd=tmp_path)
    assert done.returncode == 2
    [line] = error_lines(done)
    assert line.startswith("tickserve serve: error: bad setting TICKSERVE_REALTIME_PRIORITY:")


def in_child(code: str, expect: list[str], refusal: str) -> None:
    """Run `code` in a child process (pytest's own threads stay as they are): it prints
    `expect`, or, where this machine does not allow it, fails saying `refusal`."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    if done.returncode == 0:
        assert done.stdout.split() == expect
    else:
        assert refusal in done.stderr


def test_realtime_priority_sets_sched_fifo_or_says_why() -> None:
    code = (
        "import os; from tickserve.sched import realtime_priority; realtime_priority(3); "
        "print(os.sched_getscheduler(0) == os.SCHED_FIFO, os.sched_getparam(0).sched_priority)"
    )
    in_child(code, ["True", "3"], refusal="needs CAP_SYS_NICE")


def test_unreachable_broker_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = tickserve("feed", "--count", "1", env={"TICKSERVE_BROKER_PORT": str(port)}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"cannot reach the Kafka broker at 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    done = tickserve("serve", env={"TICKSERVE_HTTP_PORT": "0"}, cwd=tmp_path)
    assert done.returncode == 2
    lines = [line for line in error_lines(done) if line.startswith("tickserve")]
    assert len(lines) == 1
    assert "no model at models:/tickserve-crypto@champion" in lines[0]
    assert "Traceback" not in done.stderr


def test_port_in_use_names_the_component(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = tickserve("up", env={"TICKSERVE_BROKER_PORT": str(port)}, cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done) == [
        f"tickserve up: error: broker: port {port} on 127.0.0.1 is already in use"
    ]


def test_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = tickserve("serve", env={"TICKSERVE_HTTP_PORT": str(port)}, cwd=tmp_path)
    assert done.returncode == 2
    assert error_lines(done) == [f"tickserve serve: error: HTTP port {port} is already in use"]


def test_features_command_writes_one_row_per_tick(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    from features.engine import compute_features
    from features.spec import FeatureSpec
    from tests.helpers import TRADES

    out = tmp_path / "features.parquet"
    done = tickserve("features", "--input", str(TRADES), "--output", str(out), env={},
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = pd.read_parquet(out)
    trades = pd.read_parquet(TRADES)
    assert len(table) == len(trades) == 12_477
    spec = FeatureSpec()
    assert set(spec.names) | {"ready", "trade_id", "event_ns"} <= set(table.columns)
    expected = compute_features(
        spec, ["XRP/ETH"] * len(trades), trades["timestamp"].to_numpy(np.int64) * 1_000_000,
        trades["price"].to_numpy(), trades["amount"].to_numpy(),
        (trades["side"] == "buy").to_numpy(),
    )  # fmt: skip
    np.testing.assert_array_equal(table[list(spec.names)].to_numpy(), expected.values)
    assert table["ready"].tolist() == expected.ready.tolist()
    assert "ticks/s" not in done.stderr  # stderr is a pipe, not a terminal: no progress bar


def stderr_on_a_terminal(*args: str, cwd: Path) -> str:
    """Run tickserve with stderr on a 120-column pseudo-terminal; what that terminal got."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    got = bytearray()

    def drain() -> None:  # a full pty buffer would block the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed it
                return
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "MLFLOW_"))}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "deploy.cli", *args], env={**clean, "PYTHONPATH": str(ROOT)},
            cwd=cwd, stdout=subprocess.PIPE, stderr=slave, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(slave)
        reader.join()
        os.close(master)
    assert done.returncode == 0, got.decode()
    return got.decode()


def test_features_command_shows_progress_on_a_terminal_unless_told_not_to(tmp_path: Path) -> None:
    from tests.helpers import TRADES

    out = str(tmp_path / "features.parquet")
    shown = stderr_on_a_terminal("features", "--input", str(TRADES), "--output", out, cwd=tmp_path)
    # the file is read in chunks, so the bar counts ticks (no total, no percentage)
    assert "features: 12477 ticks [" in shown and "ticks/s]" in shown
    quiet = stderr_on_a_terminal(
        "features", "--input", str(TRADES), "--output", out, "--no-progress", cwd=tmp_path
    )
    assert "ticks/s" not in quiet and "100%" not in quiet
