"""Shared by the fault tests: fresh topics, a multi-symbol market, workers, a publisher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.compose import build_service
from deploy.settings import Settings
from deploy.stack import child_env
from stream.ingest.feed import Pacing, publish
from tests.helpers import ROOT, LoopThread, Pipeline, run


def market(
    pipeline: Pipeline, n: int, symbols: int = 4, tag: str = "", start: int = 0
) -> list[dict[str, Any]]:
    """`n` ticks of the real trades from trade `start` on, over `symbols` symbols (scaled
    copies), interleaved in time.

    Trade ids carry `tag`, so that two runs over one topic tell their ticks apart; a
    later run over the same symbols starts past the earlier one's trades (`start`), or
    its ticks are older than the bars the worker holds (dead letters, reason late).
    """
    out: list[dict[str, Any]] = []
    for tick in pipeline.ticks[start:]:
        for k in range(symbols):
            out.append(
                {
                    **tick,
                    "symbol": "XRP/ETH" if k == 0 else f"XRP{k}/ETH",
                    "price": tick["price"] * (1.0 + k),  # type: ignore[operator]
                    "trade_id": f"{tag}{k}-{tick['trade_id']}",
                }
            )
            if len(out) == n:
                return out
    return out


class Worker:
    """`tickserve serve` in a child process with `settings`, logging to `log`."""

    def __init__(self, settings: Settings, log: Path, http: bool = False) -> None:
        """Start it; the HTTP API on `settings.http_port` with `http`, else off."""
        self.log = log
        env = child_env(
            settings.model_copy(update={"http_port": settings.http_port if http else 0})
        )
        env["PYTHONPATH"] = str(ROOT)
        self.started = time.time()
        self._offset = log.stat().st_size if log.exists() else 0  # this run's part of the log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def text(self) -> str:
        """What this run has logged so far."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def wait_for(self, text: str, timeout_s: float = 180.0) -> None:
        """Until the log shows `text` (fails on timeout or exit, with the log's tail)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.text():
            assert self.proc.poll() is None, f"worker exited: {self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r}: {self.text()[-3000:]}"
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status (killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class Publisher:
    """Publishes ticks at `rate` per second in a thread; `join` returns the count acked.

    `stop` ends the stream early (the ticks not yet sent are not sent).
    """

    def __init__(self, settings: Settings, ticks: list[dict[str, Any]], rate: float) -> None:
        """Start publishing."""
        self.sent = 0
        self.error: BaseException | None = None
        self.stopped = threading.Event()

        def until_stopped() -> Iterator[dict[str, Any]]:
            for tick in ticks:
                if self.stopped.is_set():
                    return
                yield tick

        def body() -> None:
            try:
                self.sent = int(
                    run(
                        publish(
                            until_stopped(),
                            settings.bootstrap,  # type: ignore[call-overload]
                            settings.ticks_topic,
                            Pacing(rate=rate),
                        )
                    )
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float = 60.0) -> int:
        """Wait until every tick is acked; fails if publishing failed."""
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "publisher did not finish"
        assert self.error is None, repr(self.error)
        return self.sent


class InProcess:
    """`tickserve serve`'s service on an event loop in a thread of the test process.

    Starts in a few seconds where a child process pays every import again (a minute
    on a loaded machine); for faults that do not need to kill the worker's process.
    """

    def __init__(self, settings: Settings, online_store: bool = False, http: bool = False) -> None:
        """Build the service (the champion loaded and checked) and run it.

        With `http`, its HTTP API listens on `settings.http_port`, as `tickserve serve`'s
        does (its own thread and loop); else there is none.
        """
        port = settings.http_port if http else 0
        self.service = build_service(settings.model_copy(update={"http_port": port}), online_store)
        self.worker = self.service.worker
        self._loop = LoopThread()
        self._stop: asyncio.Event = self._loop.submit(_event()).result(5)  # type: ignore[attr-defined]
        self._done = self._loop.submit(self.service.run(self._stop))

    @property
    def alive(self) -> bool:
        """Still running (a worker that exits or raises is not)."""
        return not self._done.done()  # type: ignore[attr-defined]

    def wait_assigned(self, timeout_s: float = 90.0) -> None:
        """Until the worker has its partitions (fails if it stopped)."""
        deadline = time.monotonic() + timeout_s
        while not self.worker.assigned.is_set():
            assert self.alive, self._done.result()  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "no partition assignment"
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop it as SIGTERM does; False if it did not finish within `timeout_s`.

        Raises what the service raised, if anything.
        """
        if self.alive:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._done.result(timeout_s)  # type: ignore[attr-defined]
        except concurrent.futures.TimeoutError:
            return False  # its daemon thread is left behind
        self._loop.close()
        return True


async def _event() -> asyncio.Event:
    return asyncio.Event()
