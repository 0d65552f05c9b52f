"""Work spread over processes: slides tiled, shards checked, one unit per task."""
from __future__ import annotations

import importlib
import logging
import multiprocessing
from contextlib import contextmanager


def _start(level: int, preload: tuple[str, ...]) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    # A process has one fork server, preloaded by whoever started it first: a later caller's
    # modules are imported here, once per worker, if the server did not already hold them.
    for module in preload:
        importlib.import_module(module)


@contextmanager
def units_mapper(workers: int, units: int, preload: tuple[str, ...] = ()):
    """``map`` here, or an ordered ``imap`` over a pool of ``workers`` processes when there is
    more than one unit. Processes are not forked from the caller, which may hold threads (a server,
    a test runner): they are spawned, or, with ``preload``, forked from a fresh server process that
    imported those modules once (Great Expectations' import is seconds a worker); they log at the
    caller's level."""
    if workers < 2 or units < 2:
        yield map
        return
    if preload:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, units), initializer=_start,
                      initargs=(logging.getLogger().getEffectiveLevel(), preload)) as pool:
        yield pool.imap
