"""Work spread over processes: workers start with what the caller asked to preload, once."""
import os
import subprocess
import sys
from pathlib import Path

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


_PROBE = """
import sys, threading, xml.dom.minidom as built
from data.parallel import units_mapper
def seen(_):
    return getattr(sys.modules["xml.dom.minidom"], "BUILT_BY_CALLER", False)
if __name__ == "__main__":
    built.BUILT_BY_CALLER = True  # what a caller builds with a preloaded module before its workers start
    if sys.argv[1] == "thread":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    with units_mapper(2, 2, preload=("xml.dom.minidom",)) as mapper:
        print(list(mapper(seen, [0, 1])))
    if sys.argv[1] == "thread":
        stop.set()
"""


def test_a_caller_without_threads_forks_its_workers_and_one_with_threads_does_not(tmp_path):
    # Forked workers inherit what the caller built (Great Expectations' suite objects); a caller
    # with threads gets workers from the fork server, which never saw the caller's objects.
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for threads, expected in (("none", "[True, True]"), ("thread", "[False, False]")):
        done = subprocess.run([sys.executable, str(script), threads], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, (threads, done.stdout, done.stderr)
