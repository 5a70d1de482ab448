"""Progress with an ETA on long work outside the training loops (which have their own bars: the Trainer's
RichProgressCallback, PPO's): gates, reward scoring, perplexity, sampling, data builds, merges.

`steps(what, total)` is a context manager that yields `advance(n=1)`. The bar (what, done/total, elapsed, time
left) is drawn by rich on the stage console's stream (stderr), in the main process only; a terminal sees it move,
a log file gets its final state once the work is done (how long it took). Where another live display already runs
on that console (a bar inside a bar), the inner work goes unshown rather than garbling the outer one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from core.stage import console


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def steps(what: str, total: int | None, show: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar for `total` steps of `what` (None: a count of unknown end, as rows streamed from files); yields
    `advance(n=1)`. Nothing is drawn when `show` is false, outside the main process, or for no work at all."""
    if not show or not _main_process() or (total is not None and total <= 0):
        yield lambda n=1: None
        return
    columns = (
        [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
        if total is not None
        else [TextColumn("{task.completed}"), TimeElapsedColumn()]
    )
    bar = Progress(TextColumn("{task.description}"), *columns, console=console)
    try:
        bar.start()
    except LiveError:  # inside another bar: this work is part of that one's step
        yield lambda n=1: None
        return
    task = bar.add_task(what, total=total)
    try:
        yield lambda n=1: bar.advance(task, n)
    finally:
        bar.stop()
