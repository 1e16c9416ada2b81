"""Readable logs and live progress bars (rich), shared by the stages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        datefmt="[%X]", handlers=[handler], force=True)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # Through the environment, not by importing transformers here: that import takes a second or
    # more, which the stages that load no model (chunk, tasks, teach, dataset) should not pay.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # imported already: it has read the environment, tell it directly
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def teacher_progress(expected: int, cfg) -> Iterator:
    """A bar with done / failed / retried counts, tokens and cost so far."""
    columns = [TextColumn("teacher"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]
    last, latest = [0.0], [None]
    with Progress(*columns, console=console, disable=not sys.stderr.isatty()) as progress:
        bar = progress.add_task("teacher", total=expected, info="")

        def draw(stats) -> None:
            finished = stats.done + stats.cached + stats.failed + stats.unsent
            tokens = stats.prompt_tokens + stats.completion_tokens
            info = (f"done {stats.done} cached {stats.cached} failed {stats.failed} retried {stats.retried} "
                    f"tokens {tokens:,} cost {stats.cost:.4f}")
            progress.update(bar, completed=finished, total=max(expected, stats.planned), info=info)

        def update(stats) -> None:
            # Called once per request: redraw at most 10 times a second, so that thousands of
            # requests a second cost the client nothing.
            latest[0] = stats
            now = time.monotonic()
            if now - last[0] >= 0.1:
                last[0] = now
                draw(stats)

        try:
            yield update
        finally:
            if latest[0] is not None:  # the last requests fell inside the 0.1 s window: show the end state
                draw(latest[0])
