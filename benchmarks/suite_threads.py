"""The test suite's wall time with torch's threads shared out among the pytest-xdist workers (what
tests/conftest.py sets: cores / workers each) against a thread per core in every worker and every
process a test starts (torch's own default), alternating in rounds (ABAB) on the same modules.

    .venv/bin/python benchmarks/suite_threads.py [--rounds 2] [--workers 2] [MODULE ...]

Prints each run's seconds and the median ratio shared/per-core over rounds, with its range. The
default modules are two that train and serve end to end, so that both workers are busy at once,
as they are through most of `make test`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_readme.py", "tests/test_privacy.py"]


def run(modules: list[str], workers: int, threads: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", str(workers), "--dist", "loadfile", "-q",
                           "-p", "no:cacheprovider", *modules], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"pytest failed ({'per core' if threads else 'shared'}):\n{done.stdout[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=MODULES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    per_core = str(os.cpu_count() or 1)
    ratios = []
    for round_ in range(args.rounds):
        shared = run(args.modules, args.workers, None)
        every = run(args.modules, args.workers, per_core)
        ratios.append(shared / every)
        print(f"round {round_ + 1}: shared {shared:.0f} s, {per_core} per process {every:.0f} s, ratio {ratios[-1]:.2f}",
              flush=True)
    print(f"shared / per core: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
