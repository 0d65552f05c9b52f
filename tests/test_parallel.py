"""Work spread over processes: workers start with what the caller asked to preload, once."""
import sys

from data.parallel import units_mapper


def _imported(module: str) -> bool:
    return module in sys.modules


def test_workers_start_with_the_preloaded_modules_imported_and_spawned_ones_without():
    # A module nothing here imports: forked from a server that imported it, or spawned bare.
    module = "xml.dom.minidom"
    with units_mapper(2, 4, preload=(module,)) as mapper:
        assert list(mapper(_imported, [module] * 4)) == [True] * 4
    with units_mapper(2, 4) as mapper:
        assert list(mapper(_imported, [module] * 4)) == [False] * 4
    # The process's fork server already runs (preloaded with the module above); another caller's
    # modules still reach its workers.
    other = "xml.dom.pulldom"
    with units_mapper(2, 4, preload=(other,)) as mapper:
        assert list(mapper(_imported, [other] * 4)) == [True] * 4
