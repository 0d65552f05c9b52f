"""Work spread over processes: slides tiled, shards checked, one unit per task."""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import threading
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
    more than one unit; they log at the caller's level. With ``preload``, the workers need those
    modules (Great Expectations' import is seconds a process): a caller with no thread but its
    own (a command line) imports them and forks its workers, which start with the modules and
    whatever the caller built with them. A caller holding threads (a server, a test runner) must
    not fork: its workers fork from a fresh server process that imported the modules once.
    Without ``preload`` they are spawned."""
    if workers < 2 or units < 2:
        yield map
        return
    if preload and threading.active_count() == 1:
        for module in preload:
            importlib.import_module(module)
        context = multiprocessing.get_context("fork")
    elif preload:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, units), initializer=_start,
                      initargs=(logging.getLogger().getEffectiveLevel(), preload)) as pool:
        yield pool.imap
