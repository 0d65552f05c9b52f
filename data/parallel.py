"""Work spread over processes: slides tiled, shards checked, one unit per task."""
from __future__ import annotations

import logging
import multiprocessing
from contextlib import contextmanager


def _log_like(level: int) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")


@contextmanager
def units_mapper(workers: int, units: int):
    """``map`` here, or an ordered ``imap`` over a pool of ``workers`` processes when there is
    more than one unit. Processes are spawned, not forked: the caller may hold threads (a server,
    a test runner); they log at the caller's level."""
    if workers < 2 or units < 2:
        yield map
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, units), initializer=_log_like, initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        yield pool.imap
