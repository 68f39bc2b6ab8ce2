"""Progress bars for long offline steps: tqdm on stderr, other output kept off the bar's line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr
from typing import Any


@contextmanager
def progress_bar(
    desc: str, total: int | None = None, unit: str = " ticks", enabled: bool = False
) -> Iterator[Any]:
    """A tqdm bar on stderr, closed on the way out even when the step fails.

    Disabled, it writes nothing and `update` costs next to nothing. Enabled, log
    records and anything else written to `sys.stderr` (MLflow's notices, warnings)
    go out through `tqdm.write` while it shows, so no line, JSON log lines included,
    is spliced into the bar. The command line enables it only when stderr is a terminal.

    Args:
        desc: What is being done; `set_description_str` changes it step by step.
        total: How many units make 100% (None: a counter without a total).
        unit: The unit counted (" ticks", "step").
        enabled: Draw the bar at all.
    """
    from tqdm import tqdm
    from tqdm.contrib import DummyTqdmFile
    from tqdm.contrib.logging import logging_redirect_tqdm

    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total, desc=desc, unit=unit, disable=not enabled))
        if enabled:
            stack.enter_context(logging_redirect_tqdm())
            # the stubs give the wrapper no flush(); it forwards flush to sys.stderr at run time
            stack.enter_context(redirect_stderr(DummyTqdmFile(sys.stderr)))  # type: ignore[type-var]
        yield bar
